"""guard.py: every way a job can end gives the same exit code and run status in every job."""

from __future__ import annotations

import logging
import signal

import pytest

from facts import RunState
from remote.jobs.dataset import DatasetError
from remote.jobs.errors import Interrupted, JobError
from remote.jobs.guard import Guard
from remote.jobs.memory import MemoryEstimateError
from remote.jobs.rundir import RunDir


def ended(tmp_path, exc: BaseException | None, capsys):
    """(exit code, run.json, stderr) after a body that opens a run and raises ``exc``."""
    guard = Guard()

    def body() -> int:
        guard.track(RunDir.create(tmp_path, "r", job="finetune", args={}, overwrite=True))
        if exc is not None:
            raise exc
        return 0

    code = guard.main(body)
    return code, guard.run.read_meta(), capsys.readouterr().err


@pytest.mark.parametrize(
    "exc",
    [
        JobError("no such file x. Give --dataset"),
        DatasetError("bad column"),
        MemoryEstimateError("needs 9 GiB"),
    ],
)
def test_user_errors_are_one_line_exit_1_and_failed(tmp_path, capsys, exc):
    code, meta, err = ended(tmp_path, exc, capsys)
    assert code == 1 and meta["status"] == RunState.FAILED
    assert err == f"error: {str(exc).rstrip('.')}.\n" and meta["error"] == err[7:-1]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (Interrupted(signal.SIGTERM, step=7), 143),
        (Interrupted(signal.SIGINT), 130),
        (KeyboardInterrupt(), 130),
    ],
)
def test_interrupts_keep_status_interrupted(tmp_path, capsys, exc, code):
    got, meta, err = ended(tmp_path, exc, capsys)
    assert got == code and meta["status"] == RunState.INTERRUPTED
    assert "--resume --name r" in err and "Traceback" not in err
    assert meta.get("step") == getattr(exc, "fields", {}).get("step")


def test_a_bug_keeps_its_traceback_and_marks_the_run_failed(tmp_path, capsys):
    with pytest.raises(ZeroDivisionError):
        ended(tmp_path, ZeroDivisionError("bug"), capsys)
    meta = RunDir(tmp_path / "r").read_meta()
    assert meta["status"] == RunState.FAILED and "ZeroDivisionError" in meta["error"]


def test_the_train_log_is_detached_however_the_job_ends(tmp_path, capsys):
    handlers = list(logging.getLogger("tinycloud").handlers)
    for exc in (None, JobError("x"), Interrupted(signal.SIGTERM)):
        ended(tmp_path, exc, capsys)
        assert logging.getLogger("tinycloud").handlers == handlers
