"""Summarises the forks of docs/experiments/autopsy/forks.sh: per fork, the largest training loss
after the fork and its step, the first step above 3x the run's first loss (the sweeps' loss
explosion), the logged spikes, the validation loss after each epoch; per source run and change,
how many batch orders exploded. Writes forks.json and forks.md beside this script; reads each
fork's metrics.jsonl when it is there (not committed: forks.json keeps what the tables need).

    python3 docs/experiments/autopsy/forks.py
"""

import json
import statistics
from pathlib import Path

here = Path(__file__).parent
ARMS = ["control", "beta2_0.99", "eps_1e-6", "lr_5e-4", "agc_0.1"]


def fork_facts(d):
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if r["kind"] == "step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    last = len(epochs)  # the fork trained 3 epochs
    fork_epoch = last - 3
    fork_step = next(r["steps_end"] for r in epochs if r["epoch"] + 1 == fork_epoch)
    first = steps[0]["loss"]
    after = [r for r in steps if r["step"] >= fork_step and r.get("loss") is not None]
    worst = max(after, key=lambda r: r["loss"])
    over = [r["step"] for r in after if r["loss"] > 3 * first]
    return {
        "fork_epoch": fork_epoch,
        "fork_step": fork_step,
        "max_loss": worst["loss"],
        "max_loss_step": worst["step"],
        "explosion_step": over[0] if over else None,
        "spikes": sum(1 for r in after if r["outcome"] == "spike_logged"),
        "val": {str(r["epoch"] + 1): r["val_loss"] for r in epochs if r["epoch"] + 1 > fork_epoch},
    }


def main():
    old = json.loads((here / "forks.json").read_text())["forks"] if (here / "forks.json").is_file() else {}
    facts = {}
    for d in sorted((here / "forks").glob("*/*-s*")):
        key = f"{d.parent.name}/{d.name}"
        s = d / "summary.json"
        if s.is_file() and json.loads(s.read_text()).get("finished"):
            facts[key] = fork_facts(d) if (d / "metrics.jsonl").is_file() else old[key]
    lines = []
    for run in sorted({k.split("/")[0] for k in facts}):
        fs_run = {k: v for k, v in facts.items() if k.startswith(run + "/")}
        any_fork = next(iter(fs_run.values()))
        last = str(any_fork["fork_epoch"] + 3)
        lines += [
            f"**{run}**, forked at epoch {any_fork['fork_epoch']}'s end (step {any_fork['fork_step']}), 3 epochs on:",
            "",
            f"| change | batch orders exploded (3x the first loss) | exploded at step (batch order) | largest training loss per batch order | validation loss after epoch {last}, median [range] |",
            "|---|---|---|---|---|",
        ]
        for arm in ARMS:
            order = lambda k: k.split("-s")[-1]  # noqa: E731
            fs = {k.split("/")[1]: v for k, v in fs_run.items() if k.split("/")[1].startswith(arm + "-s")}
            fs = dict(sorted(fs.items(), key=lambda kv: int(order(kv[0]))))
            if not fs:
                continue
            exploded = [k for k, v in fs.items() if v["explosion_step"] is not None]
            at = ", ".join(f"{fs[k]['explosion_step']} ({order(k)})" for k in exploded) or "-"
            worst = ", ".join(f"{v['max_loss']:.3g} ({order(k)})" for k, v in fs.items())
            finals = [v["val"][last] for v in fs.values()]
            lines.append(f"| {arm} | {len(exploded)}/{len(fs)} | {at} | {worst} | {statistics.median(finals):.4f} [{min(finals):.4f}, {max(finals):.4f}] |")
        lines.append("")
    (here / "forks.json").write_text(json.dumps({"forks": facts}, indent=1, sort_keys=True) + "\n")
    (here / "forks.md").write_text("\n".join(lines))
    print("\n".join(lines))


main()
