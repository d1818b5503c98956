"""Format what ``probe.py`` reports as the tables `fab runs` and `fab status` print."""

from __future__ import annotations

from typing import Any

from facts import RunKey, duration
from remote.costs import usd

GIB = 1024**3


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def runs_table(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs yet. Start one with `fab train pretrain`."
    rows = [
        [
            r["name"],
            r.get("job") or "?",
            r["state"],
            _steps(r),
            _elapsed(r),
            _cost(r),
            r.get("started_at") or "",
        ]
        for r in runs
    ]
    return _table(["RUN", "JOB", "STATE", "STEP", "TIME", "COST", "STARTED"], rows)


def status_table(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs yet. Start one with `fab train pretrain`."
    rows = [
        [
            r["name"],
            r.get("job") or "?",
            r["state"],
            _steps(r),
            _num(r.get("loss"), ".4f"),
            _rate(r.get("tokens_per_s")),
            _elapsed(r),
            _cost(r),
            _eta(r),
        ]
        for r in runs
    ]
    return _table(["RUN", "JOB", "STATE", "STEP", "LOSS", "TOKENS/S", "TIME", "COST", "ETA"], rows)


def compare_table(runs: list[dict[str, Any]]) -> str:
    """`fab runs --compare`: what each run trained on, how long it took, what it reached."""
    rows = [
        [
            r["name"],
            r.get("job") or "?",
            _data(r),
            _steps(r),
            _elapsed(r),
            _rate(r.get(RunKey.TOKENS_PER_S)),
            _num(r.get(RunKey.FINAL_VAL_LOSS), ".4f"),
            _num(r.get(RunKey.BEST_VAL_LOSS), ".4f"),
            _cost(r),
        ]
        for r in runs
    ]
    header = ["RUN", "JOB", "DATA", "STEPS", "TIME", "TOKENS/S", "FINAL VAL", "BEST VAL", "COST"]
    return _table(header, rows)


def _data(r: dict[str, Any]) -> str:
    if r.get(RunKey.TRAIN_EXAMPLES) is not None:
        return f"{r[RunKey.TRAIN_EXAMPLES]:,} examples"
    if r.get(RunKey.TRAIN_TOKENS) is not None:
        return f"{r[RunKey.TRAIN_TOKENS]:,} tokens"
    return "-"


def host_line(host: dict[str, Any]) -> str:
    parts = [f"{host.get('cpus', '?')} CPUs"]
    if host.get("load"):
        parts[0] += ", load " + " ".join(f"{x:.2f}" for x in host["load"])
    if host.get("mem_total"):
        used = host["mem_total"] - host["mem_available"]
        parts.append(f"memory {used / GIB:.1f}/{host['mem_total'] / GIB:.1f} GiB used")
    if host.get("disk_total"):
        used = host["disk_total"] - host["disk_free"]
        parts.append(f"disk {used / GIB:.0f}/{host['disk_total'] / GIB:.0f} GiB used")
    return "host: " + " · ".join(parts)


def _steps(r: dict[str, Any]) -> str:
    step, total = r.get("step"), r.get("max_steps")
    if step is None:
        return "-"
    return f"{step}/{total}" if total else str(step)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rate(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _elapsed(r: dict[str, Any]) -> str:
    seconds = r.get(RunKey.ELAPSED_S)
    return "-" if seconds is None else duration(seconds)


def _cost(r: dict[str, Any]) -> str:
    """The job's own figure; for a run that recorded only its rate, rate x time."""
    cost, rate = r.get(RunKey.COST_USD), r.get(RunKey.COST_PER_HOUR_USD)
    if cost is None and rate is not None and r.get(RunKey.ELAPSED_S) is not None:
        cost = rate * r[RunKey.ELAPSED_S] / 3600
    return usd(cost)


def _eta(r: dict[str, Any]) -> str:
    eta = r.get("eta_s")
    if r["state"] != "running" or eta is None:
        return "-"
    return duration(eta)
