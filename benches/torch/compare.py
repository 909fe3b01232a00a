"""fnokern beside PyTorch eager on the same generator, weights and batch.

1. Parity: fnokern writes its initial weights (`fnokern model --save-weights`) and computes the
   loss, output and every gradient of one batch (`fnokern grad`); the twin (twin.py) loads the
   same weights and must agree (relative error per tensor printed; exits 1 beyond 1e-3).
2. Speed: the same training step (forward, physics loss, backward, global-norm clipping at 1.0,
   Adam) in rounds that alternate fnokern (`fnokern bench-step`) and PyTorch, each the median of
   --steps steps; prints each side's median over rounds with its spread ((max - min) / median of
   the rounds) and the ratio with the range of the per-round ratios. When a side's rounds spread
   by more than --max-spread (15%), the machine was not quiet enough for a ratio: it says so and
   exits 3 instead of printing one. With --device cuda both run on
   GPU 0 (fnokern `bench-step --device cuda`, the twin on CUDA, each step synchronised).

Usage: python compare.py --fnokern target/release/fnokern --preset cpu --depth 8 [--threads 2]
       [--device cuda]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import twin  # noqa: E402

# The presets' model fields (fnokern's src/config.rs `presets`).
PRESETS = {
    "cpu": dict(width=8, max_channels=64, modes=6, n=32, batch=16),
    "study": dict(width=32, max_channels=512, modes=12, n=64, batch=16),
}


def run(cmd, env=None):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr}{out.stdout}")
    return out.stdout


def rel(a, b):
    """Largest entry of |a - b| over the largest of |b| (complex tensors as real pairs)."""
    a, b = (torch.view_as_real(t.detach()) if t.is_complex() else t.detach() for t in (a, b))
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def parity(args, p, tmp):
    common = ["--preset", args.preset, "--depth", str(args.depth)]
    weights, batch, out = tmp / "w.safetensors", tmp / "batch.safetensors", tmp / "out.safetensors"
    run([args.fnokern, "model", *common, "--save-weights", str(weights)])
    rng = np.random.default_rng(0)
    n, b = p["n"], p["batch"]
    diffraction = np.abs(rng.standard_normal((b, 1, n, n))).astype(np.float32)
    probe = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))).astype(np.complex64)
    twin.save_file({"diffraction": diffraction, "probe": probe}, str(batch))
    run([args.fnokern, "grad", *common, "--weights", str(weights), "--batch", str(batch), "--out", str(out)])
    ref = twin.load_file(str(out))

    model = twin.load(twin.Generator(args.depth, p["width"], p["max_channels"], p["modes"], n), str(weights))
    x = torch.from_numpy(diffraction)
    o = model(x)
    loss = twin.normalized_amplitude_mae(o, x, torch.from_numpy(probe))
    loss.backward()
    worst = max(rel(loss, ref["loss"]), rel(o, ref["output"]))
    print(f"parity: loss fnokern {float(ref['loss']):.8e} torch {float(loss.detach()):.8e}; output rel err {rel(o, ref['output']):.2e}")
    grads = {name: rel(prm.grad, ref[f"grad.{name}"]) for name, prm in model.named_parameters()}
    name = max(grads, key=grads.get)
    worst = max(worst, grads[name])
    print(f"parity: {len(grads)} gradients, largest relative error {grads[name]:.2e} ({name})")
    return worst, weights, x


def torch_step_ms(model, opt, x, probe, steps):
    times = []
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = twin.normalized_amplitude_mae(model(x), x, probe)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fnokern", required=True)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-spread", type=float, default=0.15)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    p = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        worst, weights, x = parity(args, p, Path(tmp))
        dev = torch.device(args.device)
        model = twin.load(twin.Generator(args.depth, p["width"], p["max_channels"], p["modes"], p["n"]), str(weights)).to(dev)
        x = x.to(dev)
        probe = torch.randn(p["n"], p["n"], dtype=torch.complex64).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch_step_ms(model, opt, x, probe, 2)  # warm-up: Adam's moments exist
        env = {"RAYON_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
        if args.device == "cuda":
            # The GPU's driver and libraries, as the caller found them.
            env["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH", "")
        ours, theirs = [], []
        for r in range(args.rounds):
            line = run(
                [args.fnokern, "bench-step", "--preset", args.preset, "--depth", str(args.depth), "--steps", str(args.steps), "--device", args.device],
                env=env,
            )
            ours.append(float(re.search(r"median ([0-9.]+) ms", line).group(1)))
            theirs.append(torch_step_ms(model, opt, x, probe, args.steps))
            print(f"round {r + 1}: fnokern {ours[-1]:.1f} ms, torch {theirs[-1]:.1f} ms")
    where = f"{args.threads} threads" if args.device == "cpu" else torch.cuda.get_device_name(0)
    if worst > 1e-3:
        sys.exit(f"parity failed: relative error {worst:.2e}")
    if not sides_and_ratio(ours, theirs, f"{args.preset} preset, depth {args.depth}, batch {p['batch']}, {where}", args.max_spread):
        sys.exit(3)


def sides_and_ratio(ours, theirs, label, max_spread):
    """Prints each side's median over its rounds (ms per step) with the spread, (max - min) /
    median, then `label: fnokern / PyTorch = ratio` with the range of the per-round ratios; when a
    side's rounds spread by more than `max_spread`, says that the machine was not quiet enough
    instead of a ratio. Returns whether it printed a ratio."""
    spreads = {}
    for name, xs in (("fnokern", ours), (f"PyTorch {torch.__version__} eager", theirs)):
        m = statistics.median(xs)
        spreads[name] = (max(xs) - min(xs)) / m
        print(f"{name}: median {m:.1f} ms per step over {len(xs)} rounds ({min(xs):.1f}-{max(xs):.1f}, spread {100 * spreads[name]:.1f}%)")
    noisy = {k: v for k, v in spreads.items() if v > max_spread}
    if noisy:
        said = ", ".join(f"{k} {100 * v:.1f}%" for k, v in noisy.items())
        print(f"no ratio: rounds spread by more than {100 * max_spread:.0f}% ({said}); the machine was not quiet enough, run again")
        return False
    ratios = [a / b for a, b in zip(ours, theirs)]
    f, t = statistics.median(ours), statistics.median(theirs)
    print(f"{label}: fnokern / PyTorch = {f / t:.2f} (medians {f:.1f} / {t:.1f} ms; per-round ratios {min(ratios):.2f}-{max(ratios):.2f})")
    return True


if __name__ == "__main__":
    main()
