"""`--target local`: the same tasks and the same jobs on this machine, no SSH, no cloud.

One real pretrain: started detached, cancelled (SIGTERM: it checkpoints and says
"interrupted"), resumed to a new step budget, followed to the end, then fetched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from remote_harness import TINY_PRETRAIN as FLAGS
from remote_harness import fab_fixture, kill_group, local_fixture  # noqa: F401


def _meta(env: dict[str, str]) -> dict:
    path = Path(env["TINYCLOUD_HOME"]) / "local" / "work" / "runs" / "loc" / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_local_train_cancel_resume_follow_fetch(fab, local):
    started = fab(
        local, "train", "pretrain", "--name", "loc", "--args", f"{FLAGS} --max-steps 5000"
    )
    assert started.code == 0, started.text
    work = Path(local["TINYCLOUD_HOME"]) / "local" / "work"
    assert str(work / "runs" / "loc") in started.out
    pid = int((work / "runs" / "loc" / ".pid").read_text())
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"TINYCLOUD_COST_PER_HOUR=0.0" in environ, "a local job is told it costs nothing"

    deadline = time.monotonic() + 240
    while (_meta(local).get("step") or 0) < 3:
        assert time.monotonic() < deadline, "the local job made no progress"
        time.sleep(0.5)
    cancelled = fab(local, "cancel", "loc", "--grace", "60")
    assert cancelled.code == 0, cancelled.text
    assert "loc: stopped" in cancelled.out  # it exited on SIGTERM, no SIGKILL needed
    meta = _meta(local)
    assert meta["status"] == "interrupted", meta
    assert (work / "runs" / "loc" / "ckpt.pt").exists()
    assert " interrupted " in fab(local, "status").out

    budget = meta["step"] + 3
    resumed = fab(
        local,
        "train",
        "pretrain",
        "--name",
        "loc",
        "--resume",
        "--follow",
        "--args",
        f"{FLAGS} --max-steps {budget}",
    )
    assert resumed.code == 0, resumed.text
    assert "resumed loc at step" in resumed.out  # --follow streamed train.log
    assert f"step {budget}/{budget}" in resumed.out
    _wait_gone(work / "runs" / "loc" / ".pid")
    assert _meta(local)["status"] == "completed"

    fetched = fab(local, "fetch", "loc")
    assert fetched.code == 0, fetched.text
    out = Path(local["TINYCLOUD_LOCAL_RUNS"]) / "loc"
    assert (out / "model" / "model.safetensors").exists() and (out / "loss.png").exists()
    assert "0 already here" in fetched.out


def _wait_gone(pid_file: Path, timeout: float = 60) -> None:
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.2)
    raise AssertionError("the job did not exit")


def test_local_target_needs_no_stack_and_refuses_ssh_only_tasks(fab, local):
    r = fab(local, "runs")
    assert r.code == 0 and "no runs yet" in r.out
    assert fab(local, "ssh").code == 1
    assert "no tunnel" in fab(local, "tunnel").err
    bad = fab(local, "train", "pretrain", "--name", "x", "--args", "--runs-dir /tmp")
    assert bad.code == 1 and "--runs-dir is set by fab" in bad.err
    typo = fab(local, "train", "pretrain", "--name", "bad/name")
    assert typo.code == 1 and "run name 'bad/name'" in typo.err
    unknown = fab(local, "train", "pretrian")
    assert unknown.code == 1 and "unknown job 'pretrian'" in unknown.err
