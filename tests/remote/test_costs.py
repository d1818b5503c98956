"""Time and money: each run's time and cost in `fab runs`/`fab status`, `fab runs --compare`
(table and PNG), the VM's cost since its last start, the stack's total from the VM's boot log,
and the run-time cap's countdown.

The runs are real run directories (``run.json`` + ``metrics.jsonl``, the job contract) read by
the real ``probe.py``; `fab` runs in-process on `--target local` and, for the VM's own files
(settings and boot log), through the loopback sshd standing in for the VM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from remote_harness import fab_fixture, moto_fixture, sshd_fixture, vm_fixture  # noqa: F401

from remote import costs, probe

HOUR = 3600


def stamp(seconds_ago: float = 0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds_ago))


def make_run(root: Path, name: str, **meta) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    rows = meta.pop("rows", [])
    (d / "run.json").write_text(json.dumps({"name": name, "updated_at": stamp(), **meta}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def curve(steps: int, start: float) -> list[dict]:
    rows = [{"step": s, "loss": start - 0.1 * s, "time": 1.0 * s} for s in range(1, steps + 1)]
    return rows + [{"step": steps, "val_loss": start - 0.05 * steps}]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def run_probe(runs: Path, *vm_files: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", Path(probe.__file__).read_text(), str(runs), *map(str, vm_files)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


# --- probe: live runs counted up to now, the VM's own files ---------------------------------------


def test_probe_counts_a_live_run_up_to_now_and_reads_the_vms_files(tmp_path):
    runs = tmp_path / "runs"
    make_run(
        runs,
        "live",
        status="running",
        pid=os.getpid(),
        elapsed_s=100.0,
        cost_per_hour_usd=0.36,
        cost_usd=0.01,
        updated_at=stamp(60),
    )
    make_run(runs, "done", status="completed", pid=dead_pid(), elapsed_s=100.0, cost_usd=0.01)
    settings = tmp_path / "idle.env"
    settings.write_text("TINYCLOUD_API_PORT=8080\nTINYCLOUD_MAX_RUN_HOURS=12\n")
    boot_log = tmp_path / "boots.log"
    boot_log.write_text("aaa 1000 4600\nbbb 9000 9060\nnot a line\n")
    doc = run_probe(runs, settings, boot_log)
    got = {r["name"]: r for r in doc["runs"]}
    assert 159 <= got["live"]["elapsed_s"] <= 170  # 100 s written a minute ago, still running
    assert got["live"]["cost_usd"] == pytest.approx(0.36 * got["live"]["elapsed_s"] / HOUR)
    assert got["done"]["elapsed_s"] == 100.0 and got["done"]["cost_usd"] == 0.01
    host = doc["host"]
    assert host["max_run_hours"] == 12 and host["boots"] == [[1000, 4600], [9000, 9060]]
    assert host["uptime_s"] > 0 and abs(host["now"] - time.time()) < 30
    bare = run_probe(runs, tmp_path / "none.env", tmp_path / "none.log")["host"]
    assert "max_run_hours" not in bare and "boots" not in bare  # not a tinycloud VM


# --- the stack's total from the boot log ------------------------------------------------------


def test_stack_spend_adds_running_time_and_prices_the_rest_as_stopped():
    r = costs.Rates(running=0.112, stopped=0.016, basis="test")
    now = 100 * HOUR
    boots = [[0, 2 * HOUR], [10 * HOUR, 13 * HOUR], [99 * HOUR, 99 * HOUR + 60]]
    s = costs.stack_spend(boots, uptime_s=HOUR, now=now, r=r)  # the last boot is this one
    assert s.running_s == 6 * HOUR and s.stopped_s == 94 * HOUR and s.since == 0
    assert s.usd == pytest.approx(6 * 0.112 + 94 * 0.016)
    fresh = costs.stack_spend(boots[:2], uptime_s=30, now=now, r=r)  # booted 30 s ago
    assert fresh.running_s == 5 * HOUR + 30
    unpriced = costs.stack_spend(boots, HOUR, now, costs.Rates(None, 0.016, "test"))
    assert unpriced.usd is None


def test_vm_lines_say_since_start_total_and_cap():
    r = costs.Rates(running=0.112, stopped=0.016, basis="test")
    now = time.time()
    host = {
        "uptime_s": 2 * HOUR,
        "now": now,
        "boots": [[int(now - 30 * HOUR), int(now - 29 * HOUR)], [int(now - 2 * HOUR), int(now)]],
        "max_run_hours": 12,
    }
    vm, stack, cap = costs.vm_lines(host, r)
    assert vm == "vm: up 2:00:00 since its last start ≈ $0.22 ($0.112/hour)"
    assert stack.startswith("stack: 3:00:00 running + 27:00:00 stopped since ")
    assert stack.endswith(f"≈ ${3 * 0.112 + 27 * 0.016:.2f} in all (estimate at list prices)")
    assert cap.startswith("cap: the VM stops itself 10:00:00 from now (maxRunHours 12)")
    assert costs.vm_lines({"uptime_s": 5.0}, r)[1].startswith("stack: total not known")
    assert costs.vm_lines(host, None) == [cap]  # --host: no prices, but the cap still shows
    assert costs.usd(0.001) == "<$0.01" and costs.usd(0) == "$0.00" and costs.usd(None) == "-"


# --- `fab runs`, `fab status`, `fab runs --compare` on this machine ---------------------------


@pytest.fixture
def local(tmp_path):
    env = {
        "TINYCLOUD_TARGET": "local",
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_LOCAL_RUNS": str(tmp_path / "runs"),
    }
    runs = tmp_path / "state" / "local" / "work" / "runs"
    common = dict(
        status="completed", pid=dead_pid(), job="finetune", max_steps=100, cost_per_hour_usd=0.0
    )
    make_run(
        runs,
        "ft-100",
        **common,
        step=100,
        elapsed_s=125.0,
        cost_usd=0.0,
        train_examples=100,
        tokens_per_s=812.4,
        best_val_loss=2.1,
        final_val_loss=2.25,
        rows=curve(10, 4.0),
    )
    make_run(
        runs,
        "ft-500",
        **common,
        step=100,
        elapsed_s=3725.0,
        cost_usd=0.0,
        train_examples=500,
        tokens_per_s=799.0,
        best_val_loss=1.9,
        final_val_loss=1.95,
        rows=curve(10, 3.5),
    )
    return env, runs


def test_runs_and_status_show_time_and_cost(fab, local):
    env, _ = local
    listed = fab(env, "runs")
    assert listed.code == 0, listed.text
    head, *rows = listed.out.splitlines()
    assert head.split() == ["RUN", "JOB", "STATE", "STEP", "TIME", "COST", "STARTED"]
    assert rows[0].split()[:6] == ["ft-100", "finetune", "completed", "100/100", "0:02:05", "$0.00"]
    status = fab(env, "status")
    assert status.code == 0, status.text
    assert "1:02:05  $0.00" in status.out
    assert "vm:" not in status.out  # this machine has no price and no boot log


def test_compare_puts_runs_side_by_side_as_a_table_and_a_png(fab, local, tmp_path):
    env, _ = local
    out = tmp_path / "cmp.png"
    r = fab(env, "runs", "--compare", "ft-100,ft-500", "--plot", str(out))
    assert r.code == 0, r.text
    lines = r.out.splitlines()
    header = ["RUN", "JOB", "DATA", "STEPS", "TIME", "TOKENS/S", "FINAL", "VAL", "BEST", "VAL"]
    assert lines[0].split() == [*header, "COST"]
    assert lines[1].split() == [
        *("ft-100", "finetune", "100", "examples", "100/100", "0:02:05", "812"),
        *("2.2500", "2.1000", "$0.00"),
    ]
    assert lines[2].split()[:3] == ["ft-500", "finetune", "500"]
    assert lines[3] == f"plot: {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    default = fab(env, "runs", "--compare", "ft-500", "--compare", "ft-100")
    assert default.code == 0, default.text
    assert (Path(env["TINYCLOUD_LOCAL_RUNS"]) / "compare_ft-500_vs_ft-100.png").is_file()


def test_compare_errors_say_what_to_type(fab, local):
    env, _ = local
    one = fab(env, "runs", "--compare", "ft-100")
    assert one.code == 1 and "two runs or more, comma-separated" in one.err
    missing = fab(env, "runs", "--compare", "ft-100,nope")
    assert missing.code == 1 and "no run nope on the host (it has: ft-100, ft-500)" in missing.err
    bad = fab(env, "runs", "--compare", "ft-100,../etc")
    assert bad.code == 1 and "run name '../etc'" in bad.err


# --- through the stand-in VM: the VM's settings and boot log reach `fab status` -----------------


def test_status_over_ssh_shows_the_vm_the_stack_and_the_cap(fab, vm, sshd, tmp_path):
    now = int(time.time())
    uptime = probe.machine_uptime()  # as the probe and the cap count it
    settings = tmp_path / "idle.env"
    settings.write_text("TINYCLOUD_MAX_RUN_HOURS=720\n")
    boots = tmp_path / "boots.log"
    boots.write_text(f"old {now - 50 * HOUR} {now - 48 * HOUR}\ncur {int(now - uptime)} {now}\n")
    env = {
        **vm,
        "TINYCLOUD_VM_SETTINGS": str(sshd.hand_over(settings)),
        "TINYCLOUD_BOOT_LOG": str(sshd.hand_over(boots)),
    }
    r = fab(env, "status")
    assert r.code == 0, r.text
    lines = r.out.splitlines()
    vm_line = next(x for x in lines if x.startswith("vm: up "))
    assert "since its last start ≈ $" in vm_line and "($0.112/hour)" in vm_line
    stack = next(x for x in lines if x.startswith("stack: "))
    assert "in all (estimate at list prices)" in stack
    assert any(x.startswith("cap: the VM stops itself ") for x in lines)
    cache = Path(vm["TINYCLOUD_HOME"]) / "vmtest" / costs.BOOTS_CACHE
    assert json.loads(cache.read_text())["boots"][0] == [now - 50 * HOUR, now - 48 * HOUR]
