"""Draw several runs side by side in one PNG: their loss curves and what each cost in time.

    python -m remote.jobs.compare --out cmp.png ft-100 ft-500 ft-1000   # in $TINYCLOUD_RUNS

What `fab runs --compare A,B,...` draws on the host (where matplotlib is: the control side
has no plotting library) and then downloads. Left: validation loss (markers) and training
loss (thin lines) by step, one colour per run. Right: each run's wall time in minutes, with
its cost and data size written on the bar. Everything comes from the run directories'
``run.json`` and ``metrics.jsonl`` (see rundir.py), so finished, interrupted and running runs
all draw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from facts import METRICS, RUN_JSON, RunKey, duration
from remote.jobs.rundir import read_metrics, runs_root


def load(root: Path, name: str) -> dict[str, Any]:
    """One run's metadata and metric rows; a clear error for a run that is not there."""
    path = root / name
    try:
        meta = json.loads((path / RUN_JSON).read_text())
    except (OSError, ValueError) as err:
        why = f"error: no run {name!r} in {root} ({err}). `fab runs` lists them."
        raise SystemExit(why) from None
    return {"name": name, "meta": meta, "rows": list(read_metrics(path / METRICS))}


def label(run: dict[str, Any]) -> str:
    meta = run["meta"]
    if meta.get(RunKey.TRAIN_EXAMPLES) is not None:
        return f"{run['name']} ({meta[RunKey.TRAIN_EXAMPLES]:,} ex)"
    if meta.get(RunKey.TRAIN_TOKENS) is not None:
        return f"{run['name']} ({meta[RunKey.TRAIN_TOKENS]:,} tok)"
    return run["name"]


def draw(runs: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the VM
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        train = [(r["step"], r["loss"]) for r in run["rows"] if "loss" in r and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in run["rows"] if "val_loss" in r and "step" in r]
        if train:
            curves.plot(*zip(*train, strict=True), color=colour, linewidth=0.8, alpha=0.45)
        if val:
            curves.plot(*zip(*val, strict=True), color=colour, marker="o", label=label(run))
        elif train:
            curves.plot([], [], color=colour, label=label(run))
    curves.set(xlabel="step", ylabel="loss", title="validation (markers) and training loss")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")

    names = [run["name"] for run in runs]
    minutes = [(run["meta"].get(RunKey.ELAPSED_S) or 0) / 60 for run in runs]
    drawn = bars.barh(names, minutes, color=colours[: len(runs)] or None)
    for bar, run in zip(drawn, runs, strict=True):
        elapsed, cost = run["meta"].get(RunKey.ELAPSED_S), run["meta"].get(RunKey.COST_USD)
        note = " " + ("?" if elapsed is None else duration(elapsed))
        if cost is not None:
            note += " · " + ("<$0.01" if 0 < cost < 0.005 else f"${cost:.2f}")
        bars.annotate(note, (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center")
    bars.set_xlim(0, max([*minutes, 1e-3]) * 1.35)  # room for the notes
    bars.invert_yaxis()
    bars.set(xlabel="wall time (minutes)", title="time and cost")
    bars.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run names")
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--runs-dir", default=None, help="runs root (default $TINYCLOUD_RUNS)")
    args = parser.parse_args(argv)
    root = runs_root(args.runs_dir)
    print(draw([load(root, name) for name in args.runs], args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
