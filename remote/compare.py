"""`fab runs --compare A,B,...`: chosen runs side by side, as a table here and a PNG plot.

    fab runs --compare ft-100,ft-500,ft-1000     # -> the table, and runs/compare_ft-100_vs_....png

The table comes from each run's ``run.json`` (through ``probe.py``, like `fab status`). The
plot is drawn on the host by ``remote/jobs/compare.py`` with the job environment's matplotlib
(the control side installs no plotting library) and downloaded.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from invoke import Exit

from facts import RUNS_DIR_NAME, RUNS_ENV
from remote.launch import check_name, probe
from remote.runner import Runner

q = shlex.quote
HOST_DIR = "compare"  # in the host's work directory: the plots drawn there


def names(values: list[str]) -> list[str]:
    """``--compare a,b --compare c`` -> [a, b, c]; each a valid run name, none twice."""
    found = [n for v in values for n in re.split(r"[,\s]+", v) if n]
    if len(found) < 2:
        raise Exit("--compare needs two runs or more, comma-separated: --compare ft-100,ft-500")
    return list(dict.fromkeys(check_name(n) for n in found))


def pick(runner: Runner, wanted: list[str]) -> list[dict[str, Any]]:
    runs = {r["name"]: r for r in probe(runner)["runs"]}
    missing = [n for n in wanted if n not in runs]
    if missing:
        have = ", ".join(sorted(runs)) or "none"
        raise Exit(f"no run {', '.join(missing)} on the host (it has: {have}).")
    return [runs[n] for n in wanted]


def default_plot(local_runs: Path, wanted: list[str]) -> Path:
    return local_runs / f"compare_{'_vs_'.join(wanted)}.png"


def plot(runner: Runner, wanted: list[str], out: Path) -> Path:
    """Draw on the host, bring the PNG here; an `Exit` saying why when it cannot be drawn."""
    remote = f"{HOST_DIR}/{out.name}"
    argv = [runner.python(), "-m", "remote.jobs.compare", "--out", remote, *wanted]
    env = f"{RUNS_ENV}={q(runner.path(RUNS_DIR_NAME))} MPLBACKEND=Agg"
    r = runner.sh(f"{env} {shlex.join(argv)}", warn=True, timeout=300)
    if not r.ok:
        raise Exit(
            "the plot could not be drawn on the host (the table above stands):\n"
            f"{(r.stderr or r.stdout).strip()[-800:]}\n"
            "It needs matplotlib in the job environment: `fab setup` installs it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    runner.get(remote, out)
    return out
