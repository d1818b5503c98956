"""What a run, the VM and the whole stack have cost: prices from the stack, times from the VM.

    fab status     # each run's time and cost; the VM since its last start; the stack in total
    fab stop       # says what was spent, and what stopping (and destroying) still costs

Where each figure comes from, and how exact it is:

- **a run**: its own ``run.json`` (``elapsed_s``, ``cost_usd``): the job times itself and
  multiplies by ``TINYCLOUD_COST_PER_HOUR``, which `fab train` sets from the stack's
  ``cost_per_hour.running_usd`` (0 on `--target local`, unset for a --host machine).
- **the VM since its last start**: its uptime, which is what EC2 bills (per second while
  running, the first minute in full).
- **the stack since `pulumi up`**: EC2 keeps no history of an instance's starts and stops,
  and `fab` never sees the VM stop itself (idle auto-stop, the run-time cap). So the VM keeps
  its own boot log (``/var/lib/tinycloud/boots.log``, written every minute by tinycloud-cap):
  one line per boot with its start and the last minute it was seen running. The running time
  is their sum (exact to about a minute per boot); everything else since the first boot was
  stopped time, billed for the volume and the address only.

Every dollar figure is an estimate at the list prices in ``infra/prices.py`` (us-east-1,
dated): not a bill. Data transfer, snapshots and taxes are not counted, nor a volume that
outlives `pulumi destroy`. `fab` keeps the last boot log it read in
``.tinycloud/<stack>/boots.json``, for when the VM cannot be asked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from facts import Output, duration
from remote.target import Target, write_secret

BOOTS_CACHE = "boots.json"  # in the stack's state folder


@dataclass(frozen=True)
class Rates:
    """USD per hour from the stack's ``cost_per_hour`` output."""

    running: float | None  # None: the instance type is not in the price table
    stopped: float | None
    basis: str  # "us-east-1 list prices as of 2025-06-01"


def rates(target: Target) -> Rates | None:
    cost = target.outputs.get(Output.COST_PER_HOUR)
    if not isinstance(cost, dict):
        return None
    basis = f"{cost.get('price_region', '?')} list prices as of {cost.get('prices_as_of', '?')}"
    return Rates(cost.get("running_usd"), cost.get("stopped_usd"), basis)


def job_rate(target: Target) -> float | None:
    """What `fab train` tells a job its machine costs per hour: nothing on this machine."""
    if target.local:
        return 0.0
    r = rates(target)
    return r.running if r else None


def usd(amount: float | None) -> str:
    if amount is None:
        return "-"
    if 0 < amount < 0.005:
        return "<$0.01"
    return f"${amount:,.2f}"


@dataclass(frozen=True)
class Spend:
    running_s: float
    stopped_s: float
    since: float  # epoch seconds of the first boot
    usd: float | None


def stack_spend(boots: list[list[int]], uptime_s: float | None, now: float, r: Rates) -> Spend:
    """The stack's running and stopped time since its first recorded boot, and their cost.
    The current boot counts up to now (its log line is at most a minute old)."""
    booted = None if uptime_s is None else now - uptime_s
    running, seen_current = 0.0, False
    for start, last in boots:
        current = booted is not None and abs(start - booted) < 120
        seen_current = seen_current or current
        running += (now - start) if current else max(0, last - start)
    if booted is not None and not seen_current:  # booted less than a minute ago: not logged yet
        running += uptime_s
        boots = [*boots, [int(booted), int(now)]]
    first = min(start for start, _ in boots)
    stopped = max(0.0, now - first - running)
    total = None
    if r.running is not None and r.stopped is not None:
        total = (running * r.running + stopped * r.stopped) / 3600
    return Spend(running, stopped, first, total)


def vm_lines(host: dict[str, Any], r: Rates | None) -> list[str]:
    """The VM's lines under `fab status`: since its last start, the stack's total, the cap."""
    uptime = host.get("uptime_s")
    lines = []
    if r and uptime is not None:
        lines.append(since_start_line(uptime, r))
    boots = host.get("boots")
    if r and boots:
        lines.append(stack_line(stack_spend(boots, uptime, host.get("now", time.time()), r)))
    elif r and uptime is not None:
        lines.append("stack: total not known (this VM keeps no boot log: it predates it)")
    cap = host.get("max_run_hours")
    if cap and uptime is not None:
        lines.append(cap_line(cap, uptime))
    return lines


def since_start_line(
    uptime_s: float, r: Rates, head: str = "vm: up {} since its last start"
) -> str:
    cost = None if r.running is None else uptime_s * r.running / 3600
    rate = "no price for this type" if r.running is None else f"${r.running:.3f}/hour"
    return f"{head.format(duration(uptime_s))} ≈ {usd(cost)} ({rate})"


def stack_line(s: Spend, head: str = "stack:") -> str:
    day = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(s.since))
    return (
        f"{head} {duration(s.running_s)} running + {duration(s.stopped_s)} stopped since "
        f"{day} ≈ {usd(s.usd)} in all (estimate at list prices)"
    )


def cap_line(max_run_hours: int, uptime_s: float) -> str:
    left = max_run_hours * 3600 - uptime_s
    return (
        f"cap: the VM stops itself {duration(left)} from now (maxRunHours {max_run_hours}), "
        "jobs checkpointed; `fab start` then `fab train ... --resume` carries on"
    )


def save_boots(target: Target, host: dict[str, Any]) -> None:
    """Keep what the VM said, for `fab stop` when the VM cannot be reached."""
    if host.get("boots"):
        keep = {k: host.get(k) for k in ("boots", "uptime_s", "now")}
        write_secret(target.state_dir / BOOTS_CACHE, json.dumps(keep))


def load_boots(target: Target) -> dict[str, Any]:
    try:
        return json.loads((target.state_dir / BOOTS_CACHE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def spent_lines(target: Target, host: dict[str, Any], launched_s: float | None) -> list[str]:
    """What `fab stop` says was spent: this start (from the VM's uptime, or EC2's launch time
    when the VM could not be asked) and the stack's total from the freshest boot log."""
    r = rates(target)
    if r is None:
        return []
    now = time.time()
    uptime = host.get("uptime_s")
    if uptime is None and launched_s is not None:
        uptime = max(0.0, now - launched_s)
    lines = [] if uptime is None else [since_start_line(uptime, r, "this start: {} running")]
    boots = host.get("boots") or load_boots(target).get("boots")
    if boots:
        fresh = "" if host.get("boots") else " (from the last boot log fab read)"
        lines.append(stack_line(stack_spend(boots, uptime, now, r), "the stack so far:") + fresh)
    if r.stopped is not None:
        lines.append(
            f"stopped, it costs about ${r.stopped:.3f}/hour (volume and address) until "
            "`pulumi destroy`; the volume outlives that unless deleteVolumeOnDestroy is set "
            "(docs/infra.md#tear-down)"
        )
    return lines
