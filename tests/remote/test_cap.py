"""The run-time cap end to end: a real pretrain, stopped by infra/vm/tinycloud-cap.sh (the
script the VM runs every minute) when the VM has been up past maxRunHours, then resumed with
`fab train --resume`, as after `fab start`.

The job runs on `--target local`; the cap script runs against that runs directory with the
VM's settings file rendered by cloud_init and stand-ins for what would stop this machine
(``systemctl``) or needs syslog (``logger``); the uptime is a file the test sets.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from remote_harness import TINY_PRETRAIN as FLAGS
from remote_harness import fab_fixture, kill_group, local_fixture  # noqa: F401

from facts import VM_RUNS_DIR, VM_STATE_DIR
from infra import cloud_init


def run_cap(tmp_path: Path, runs: Path, uptime_s: float) -> subprocess.CompletedProcess:
    vm = tmp_path / "vm"
    (vm / "bin").mkdir(parents=True, exist_ok=True)
    for tool in ("systemctl", "logger"):
        script = vm / "bin" / tool
        script.write_text(f'#!/bin/bash\necho "$*" >>{vm}/{tool}.log\n')
        script.chmod(0o755)
    settings = cloud_init.idle_env(api_port=8080, idle_stop_minutes=60, gpu=False, max_run_hours=1)
    env_file = vm / "idle.env"
    env_file.write_text(
        settings.replace(VM_RUNS_DIR, str(runs)).replace(VM_STATE_DIR, str(vm / "state"))
    )
    (vm / "uptime").write_text(f"{uptime_s} 1.0\n")
    (vm / "boot_id").write_text("boot-1\n")
    env = {
        **os.environ,
        "PATH": f"{vm / 'bin'}:{os.environ['PATH']}",
        "TINYCLOUD_IDLE_ENV": str(env_file),
        "TINYCLOUD_UPTIME_FILE": str(vm / "uptime"),
        "TINYCLOUD_BOOT_ID_FILE": str(vm / "boot_id"),
        "TINYCLOUD_CAP_GRACE_S": "120",
    }
    script = cloud_init.VM_DIR / "tinycloud-cap.sh"
    return subprocess.run(
        ["bash", str(script), "check"], env=env, capture_output=True, text=True, timeout=200
    )


@pytest.mark.slow
def test_the_cap_checkpoints_a_real_job_and_resume_carries_on(fab, local, tmp_path):
    started = fab(
        local, "train", "pretrain", "--name", "long", "--args", f"{FLAGS} --max-steps 5000"
    )
    assert started.code == 0, started.text
    runs = Path(local["TINYCLOUD_HOME"]) / "local" / "work" / "runs"
    meta_path = runs / "long" / "run.json"

    def meta() -> dict:
        try:
            return json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return {}

    deadline = time.monotonic() + 240
    while (meta().get("step") or 0) < 3:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.5)

    under = run_cap(tmp_path, runs, uptime_s=1800)  # half an hour of a one-hour cap
    assert under.returncode == 0 and "up 30 of 60 min" in under.stdout, under.stderr
    assert meta()["status"] == "running"

    capped = run_cap(tmp_path, runs, uptime_s=3700)
    assert capped.returncode == 0, capped.stderr
    assert (tmp_path / "vm" / "systemctl.log").read_text() == "poweroff\n"
    stopped_at = meta()
    assert stopped_at["status"] == "interrupted", stopped_at
    assert (runs / "long" / "ckpt.pt").exists()

    budget = stopped_at["step"] + 2
    resumed = fab(
        local,
        "train",
        "pretrain",
        "--name",
        "long",
        "--resume",
        "--follow",
        "--args",
        f"{FLAGS} --max-steps {budget}",
    )
    assert resumed.code == 0, resumed.text
    assert "resumed long at step" in resumed.out
    deadline = time.monotonic() + 120
    while meta().get("status") != "completed":
        assert time.monotonic() < deadline, meta()
        time.sleep(0.5)
    assert meta()["step"] == budget
