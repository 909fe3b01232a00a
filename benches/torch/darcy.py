"""fnokern beside PyTorch eager and neuraloperator on the FNO paper's Darcy benchmark, on the same
generated data.

1. Data: `fnokern data --export` writes fnokern's generated Darcy splits (arrays coeff, sol).
2. Parity: fnokern writes its initial FNO-2D weights (`fnokern model --save-weights`); the PyTorch
   FNO-2D below (the paper's fourier_2d.py architecture, with fnokern's parameter names) loads
   them; both compute the loss, the output and every gradient of one batch (`fnokern grad`) and
   must agree (relative error per tensor printed; exits 1 beyond 1e-3).
3. Speed: the same training step (forward, relative L2 summed over the batch, backward, Adam with
   weight decay) in rounds alternating fnokern (`fnokern bench-step`) and PyTorch, each the median
   of --steps steps, with --threads threads; prints each side's median and spread over the rounds
   and their ratio, or no ratio when a side's rounds spread by more than --max-spread (15%).
4. Training (--epochs E > 0): three trainings on the same data with the paper's schedule (Adam
   1e-3, weight decay 1e-4, batch 20, relative L2 summed over the batch, the rate halved every 100
   epochs), at the same time, one thread each, for E epochs: fnokern (`fnokern train --config
   CONFIG --stop-after-epochs E`), the PyTorch twin from fnokern's initial weights, and
   neuraloperator's own FNO (`neuralop.models.FNO`, its own initialisation and grid embedding,
   width 32, 4 layers, 12 modes per corner, projection 128) with the same normalisers, loss and
   optimiser. Writes OUT/{fnokern,torch,neuralop}.csv (epoch, train and test relative L2, seconds)
   as they go and prints each one's mean ± sd of the test relative L2 over its last 10 epochs.
   Resumable: each PyTorch training checkpoints every epoch (OUT/<name>-ckpt.pt: weights,
   optimiser, schedule, random state) and fnokern's run resumes from its own; run the same
   command again (a larger --epochs extends) and each goes on from where it stopped.

Usage: python darcy.py --fnokern target/release/fnokern --config configs/darcy-fno2d.toml --out runs/darcy-compare [--epochs 100]
       python darcy.py --plot-only --fnokern unused --out runs/darcy-compare     # OUT/curves.png (matplotlib)
"""

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import twin  # noqa: E402
from compare import rel, run, sides_and_ratio  # noqa: E402


class Layer(nn.Module):
    def __init__(self, width, s, modes):
        super().__init__()
        self.spectral = twin.Spectral(width, s, modes)
        self.linear = nn.Conv2d(width, width, 1)


class FNO2d(nn.Module):
    """Li et al.'s FNO2d: lift (1x1, from (a, x, y)), Fourier layers (spectral conv + 1x1, GELU
    between layers), 1x1 projection, GELU, 1x1 head; the output decoded by the normaliser."""

    def __init__(self, width, modes, layers, projection, s, y_mean, y_scale):
        super().__init__()
        self.lift = nn.Conv2d(3, width, 1)
        self.layers = nn.ModuleList([Layer(width, s, modes) for _ in range(layers)])
        self.projection = nn.Conv2d(width, projection, 1)
        self.head = nn.Conv2d(projection, 1, 1)
        self.register_buffer("y_mean", y_mean)
        self.register_buffer("y_scale", y_scale)

    def forward(self, x):
        h = self.lift(x)
        for i, layer in enumerate(self.layers):
            h = layer.spectral(h) + layer.linear(h)
            if i + 1 < len(self.layers):
                h = F.gelu(h)
        y = self.head(F.gelu(self.projection(h)))
        return y * self.y_scale + self.y_mean


def rel_l2(pred, u):
    """Per-sample ||pred - u|| / ||u|| (the paper's LpLoss), [B]."""
    b = u.shape[0]
    return torch.linalg.vector_norm((pred - u).reshape(b, -1), dim=1) / torch.linalg.vector_norm(u.reshape(b, -1), dim=1)




class Data:
    """The exported splits, the normalisers fitted on the training split (pointwise mean and
    unbiased std, eps 1e-5, as the paper's UnitGaussianNormalizer), and the model inputs."""

    def __init__(self, d):
        tr, te = np.load(d / "train.npz"), np.load(d / "test.npz")
        a, u = torch.from_numpy(tr["coeff"]).float(), torch.from_numpy(tr["sol"]).float()
        self.s = a.shape[-1]
        eps = 1e-5
        self.x_mean, self.x_std = a.mean(0), a.std(0)
        self.y_mean, self.y_scale = u.mean(0), u.std(0) + eps
        grid = torch.linspace(0, 1, self.s)
        gx, gy = torch.meshgrid(grid, grid, indexing="ij")

        def inputs(coeff):
            n = coeff.shape[0]
            xa = (coeff - self.x_mean) / (self.x_std + eps)
            return torch.stack([xa, gx.expand(n, -1, -1), gy.expand(n, -1, -1)], dim=1).contiguous()

        self.train_x, self.train_u = inputs(a), u[:, None].contiguous()
        self.test_x = inputs(torch.from_numpy(te["coeff"]).float())
        self.test_u = torch.from_numpy(te["sol"]).float()[:, None].contiguous()


def build(args, data, weights):
    m = FNO2d(args.width, args.modes, args.layers, args.projection, data.s, data.y_mean[None, None], data.y_scale[None, None])
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("normalizer.")}
    missing, unexpected = m.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("y_")] or unexpected:
        sys.exit(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return m


def parity(args, data, tmp):
    weights, batch, out = tmp / "w.safetensors", tmp / "batch.safetensors", tmp / "out.safetensors"
    run([args.fnokern, "model", "--config", args.config, "--save-weights", str(weights)])
    # fnokern decodes with the normaliser its weights file holds (as a finished run's does).
    w = {k: v.numpy() for k, v in load_file(str(weights)).items()}
    w["normalizer.y.mean"], w["normalizer.y.scale"] = data.y_mean.numpy(), data.y_scale.numpy()
    save_file(w, str(weights))
    x, u = data.train_x[:20], data.train_u[:20]
    save_file({"input": x.numpy(), "u": u.numpy()}, str(batch))
    run([args.fnokern, "grad", "--config", args.config, "--weights", str(weights), "--batch", str(batch), "--out", str(out)])
    ref = load_file(str(out))
    model = build(args, data, weights)
    o = model(x)
    loss = rel_l2(o, u).mean()
    loss.backward()
    worst = max(rel(loss, ref["loss"]), rel(o, ref["output"]))
    print(f"parity: loss fnokern {float(ref['loss']):.8e} torch {float(loss.detach()):.8e}; output rel err {rel(o, ref['output']):.2e}")
    grads = {name: rel(p.grad, ref[f"grad.{name}"]) for name, p in model.named_parameters()}
    name = max(grads, key=grads.get)
    print(f"parity: {len(grads)} gradients, largest relative error {grads[name]:.2e} ({name})")
    return max(worst, grads[name]), weights


def torch_step_ms(model, opt, x, u, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        rel_l2(model(x), u).sum().backward()
        opt.step()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def speed(args, data, weights):
    torch.set_num_threads(args.threads)
    model = build(args, data, weights)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, u = data.train_x[:20], data.train_u[:20]
    torch_step_ms(model, opt, x, u, 2)
    env = {"RAYON_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
    ours, theirs = [], []
    for r in range(args.rounds):
        line = run([args.fnokern, "bench-step", "--config", args.config, "--steps", str(args.steps)], env=env)
        ours.append(float(re.search(r"median ([0-9.]+) ms", line).group(1)))
        theirs.append(torch_step_ms(model, opt, x, u, args.steps))
        print(f"round {r + 1}: fnokern {ours[-1]:.1f} ms, torch {theirs[-1]:.1f} ms")
    # As compare.py: no ratio from rounds that spread by more than --max-spread (the trainings
    # that follow run either way).
    sides_and_ratio(ours, theirs, f"Darcy FNO-2D s {data.s}, batch 20, {args.threads} threads", args.max_spread)


def csv_from(path, keep_upto):
    """Opens an epoch CSV for appending, keeping the rows of epochs <= keep_upto (a resumed
    training rewrites what came after its checkpoint)."""
    header = ["epoch", "train_rel_l2", "test_rel_l2", "seconds"]
    rows = []
    if path.exists():
        rows = [r for r in csv.DictReader(open(path)) if int(r["epoch"]) <= keep_upto]
    f = open(path, "w", newline="")
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
        w.writerow([r[h] for h in header])
    f.flush()
    return f, w


def train_pytorch(args, data, model, name, out):
    """The paper's schedule for `model` in this process, one thread, checkpointed every epoch in
    OUT/<name>-ckpt.pt and resumed from it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
    ckpt = out / f"{name}-ckpt.pt"
    start, seconds = 0, 0.0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        # neuraloperator's models add a `_metadata` entry to their state dict, which they do not load.
        model.load_state_dict({k: v for k, v in st["model"].items() if not k.endswith("_metadata")})
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        start, seconds = st["epoch"], st["seconds"]
        print(f"{name}: resumed after epoch {start}")
    n = data.train_x.shape[0]
    f, w = csv_from(out / f"{name}.csv", start)
    started = time.perf_counter() - seconds
    with f:
        for ep in range(start, args.epochs):
            model.train()
            total = 0.0
            for idx in torch.randperm(n).split(20):
                opt.zero_grad(set_to_none=True)
                loss = rel_l2(model(data.train_x[idx]), data.train_u[idx]).sum()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            sched.step()
            model.eval()
            with torch.no_grad():
                test = float(torch.cat([rel_l2(model(x), u) for x, u in zip(data.test_x.split(20), data.test_u.split(20))]).mean())
            elapsed = time.perf_counter() - started
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                        "epoch": ep + 1, "seconds": elapsed}, tmp)
            tmp.replace(ckpt)
            w.writerow([ep + 1, total / n, test, elapsed])
            f.flush()


class NeuralopFNO(nn.Module):
    """neuraloperator's own FNO on the normalised coefficient (its grid embedding adds x and y),
    decoded by the same output normaliser as the other two."""

    def __init__(self, args, data):
        super().__init__()
        from neuralop.models import FNO

        # neuraloperator counts the modes along each axis over both signs, and keeps n // 2 + 1
        # along the last, real-FFT axis: (24, 23) keeps the paper's 12 x 12 per corner.
        self.fno = FNO(n_modes=(2 * args.modes, 2 * args.modes - 1), in_channels=1, out_channels=1, hidden_channels=args.width,
                       n_layers=args.layers, projection_channel_ratio=args.projection // args.width)
        self.register_buffer("y_mean", data.y_mean[None, None])
        self.register_buffer("y_scale", data.y_scale[None, None])

    def forward(self, x):
        return self.fno(x[:, :1]) * self.y_scale + self.y_mean


def train_fnokern(args, out):
    env = {"RAYON_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run_dir = out / "fnokern-run"
    done, before = 0, 0.0
    if run_dir.exists():
        # The epochs the run has ended are its own record (metrics.jsonl: fnokern resumes after
        # the last of them); summary.json is written only when a run finishes, so an interrupted
        # run has none. The CSV is rebuilt from that record, keeping the seconds it had.
        epochs = [json.loads(l) for l in open(run_dir / "metrics.jsonl") if '"kind":"epoch"' in l] if (run_dir / "metrics.jsonl").exists() else []
        done = len(epochs)
        old = {int(r["epoch"]): r["seconds"] for r in csv.DictReader(open(out / "fnokern.csv"))} if (out / "fnokern.csv").exists() else {}
        with open(out / "fnokern.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "train_rel_l2", "test_rel_l2", "seconds"])
            for e in epochs:
                k = e["epoch"] + 1
                w.writerow([k, f"{e['train_loss']:.5g}", f"{e['val_loss']:.5g}", old.get(k, "")])
        before = max([float(v) for k, v in old.items() if k <= done and v] or [0.0])
    if done >= args.epochs:
        return
    # --stop-after-epochs counts the epochs of this invocation.
    cmd = [args.fnokern, "train", "--config", args.config, "--out", str(run_dir), "--stop-after-epochs", str(args.epochs - done)]
    if run_dir.exists():
        cmd.append("--resume")
    f, w = csv_from(out / "fnokern.csv", done)
    with f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        pat = re.compile(r"epoch\s+(\d+)/\d+: train loss ([0-9.e+-]+)\s+val loss ([0-9.e+-]+).*\((\d+) s\)")
        for line in p.stdout:
            m = pat.search(line)
            if m:
                # The seconds fnokern prints count from this invocation's start.
                w.writerow([int(m[1]), float(m[2]), float(m[3]), before + float(m[4])])
                f.flush()


NAMES = (("fnokern", "fnokern"), ("torch", "PyTorch eager (twin)"), ("neuralop", "neuraloperator FNO"))


def plot(out):
    """OUT/curves.png: test relative L2 per epoch of both, on a log axis (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in NAMES:
        if not (out / f"{name}.csv").exists():
            continue
        rows = list(csv.DictReader(open(out / f"{name}.csv")))
        ax.plot([int(r["epoch"]) for r in rows], [float(r["test_rel_l2"]) for r in rows], label=label)
    ax.axhline(0.0108, color="grey", linestyle="--", label="the paper, 500 epochs (0.0108)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (of the paper's 500-epoch schedule)")
    ax.set_ylabel("test relative L2 (100 samples)")
    ax.set_title("FNO-2D on Darcy flow, s = 85, same data")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def summary(out):
    """Each training's last epoch and the mean ± sd of its test relative L2 over its last 10."""
    for name, label in NAMES:
        path = out / f"{name}.csv"
        rows = list(csv.DictReader(open(path))) if path.exists() else []
        if not rows:
            continue
        last = rows[-1]
        tail = [float(r["test_rel_l2"]) for r in rows[-10:]]
        sd = statistics.stdev(tail) if len(tail) > 1 else float("nan")
        # Seconds per epoch: the median step between consecutive epochs whose times are known
        # (an interrupted fnokern run's earliest epochs may have lost theirs).
        known = [(int(r["epoch"]), float(r["seconds"])) for r in rows if r["seconds"]]
        steps = [(b - a) / (j - i) for (i, a), (j, b) in zip(known, known[1:]) if j > i and b > a]
        per = f"{statistics.median(steps):.1f} s per epoch" if steps else "time per epoch unknown"
        print(f"{label}: {last['epoch']} epochs, test relative L2 over epochs {rows[-len(tail)]['epoch']}-{last['epoch']}: "
              f"{statistics.mean(tail):.5f} ± {sd:.5f} (last {float(last['test_rel_l2']):.5f}); "
              f"{per} (one thread each, side by side)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fnokern", required=True)
    ap.add_argument("--config", default="configs/darcy-fno2d.toml")
    ap.add_argument("--out", default="runs/darcy-compare")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--modes", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--projection", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-spread", type=float, default=0.15, help="no step-time ratio when a side's rounds spread by more than this fraction")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--plot-only", action="store_true", help="only draw OUT/curves.png from OUT's CSV files")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        summary(out)
        plot(out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run([args.fnokern, "data", "--config", args.config, "--export", str(tmp / "data")])
        data = Data(tmp / "data")
        worst, weights = parity(args, data, tmp)
        if worst > 1e-3:
            sys.exit(f"parity failed: relative error {worst:.2e}")
        kept = out / "init.safetensors"
        kept.write_bytes(weights.read_bytes())
        if args.rounds > 0:
            speed(args, data, kept)
    if args.epochs > 0:
        torch.manual_seed(0)
        jobs = [threading.Thread(target=train_fnokern, args=(args, out)),
                threading.Thread(target=train_pytorch, args=(args, data, build(args, data, kept), "torch", out)),
                threading.Thread(target=train_pytorch, args=(args, data, NeuralopFNO(args, data), "neuralop", out))]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join()
        summary(out)
        try:
            plot(out)
        except ImportError:
            print("(no matplotlib: curves.png not drawn)")


if __name__ == "__main__":
    main()
