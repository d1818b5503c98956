"""rundir.py: --overwrite starts from an empty run dir, a run never overwrites another by
accident, and close() detaches the run's train.log."""

from __future__ import annotations

import json
import logging

import pytest

from facts import RunState
from remote.jobs import rundir
from remote.jobs.errors import JobError
from remote.jobs.rundir import RunDir


def stale_run(root, name="r") -> RunDir:
    """A finished run with every kind of file a job leaves behind."""
    run = RunDir.create(root, name, job="finetune", args={})
    run.log("old run line")
    run.append_metrics({"step": 1, "loss": 2.0})
    for rel in ("model/model.safetensors", "model/old-only.bin", "checkpoints/checkpoint-5/x",
                "tokenizer/vocab.json", "report.md", "report.jsonl", "ckpt.pt", "loss.png",
                ".ckpt.pt.abc.tmp", "console.log"):  # fmt: skip
        (run.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (run.path / rel).write_text("old")
    run.finish(RunState.COMPLETED)
    run.close()
    return run


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path):
    old = stale_run(tmp_path)
    run = RunDir.create(tmp_path, "r", job="evaluate", args={"new": 1}, overwrite=True)
    run.close()
    # console.log is the launcher's open file for this very run; run.json is rewritten
    assert sorted(p.name for p in old.path.iterdir()) == ["console.log", "run.json", "train.log"]
    assert (old.path / "console.log").read_text() == "old"
    meta = run.read_meta()
    assert meta["status"] == RunState.RUNNING and meta["args"] == {"new": 1}
    assert "old run line" not in (run.path / "train.log").read_text()


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    old = stale_run(tmp_path)
    with pytest.raises(rundir.RunExistsError, match=r"--resume.*--overwrite") as err:
        RunDir.create(tmp_path, "r", job="finetune", args={})
    assert isinstance(err.value, JobError)  # a job prints it as one line, exit 1
    assert (old.path / "model" / "old-only.bin").exists()  # refused: nothing touched
    with pytest.raises(rundir.NoSuchRunError, match="drop --resume"):
        RunDir.create(tmp_path, "nope", job="finetune", args={}, resume=True)
    with pytest.raises(rundir.BadRunNameError):
        RunDir.create(tmp_path, "../up", job="finetune", args={})
    resumed = RunDir.create(tmp_path, "r", job="finetune", args={}, resume=True)
    resumed.close()
    assert (old.path / "model" / "old-only.bin").exists() and resumed.metrics()  # kept


def test_close_detaches_the_train_log(tmp_path):
    root = logging.getLogger("tinycloud")
    before = list(root.handlers)
    a = RunDir.create(tmp_path, "a", job="pretrain", args={})
    a.log("for a")
    a.close()
    b = RunDir.create(tmp_path, "b", job="pretrain", args={})
    b.log("for b")
    b.close()
    assert root.handlers == before
    assert "for b" not in (a.path / "train.log").read_text()
    assert "for a" not in (b.path / "train.log").read_text()
    assert json.loads((b.path / "run.json").read_text())["name"] == "b"


def test_elapsed_time_and_cost_add_up_over_resumes(tmp_path, monkeypatch):
    # Each session counts from the start of the job's main (count_from), at its own price;
    # a resume carries the earlier sessions' time and cost on, --overwrite starts from zero.
    import time

    from facts import COST_PER_HOUR_ENV, RunKey

    monkeypatch.setenv(COST_PER_HOUR_ENV, "0.096")  # m5.large in us-east-1
    run = RunDir.create(tmp_path, "r", job="pretrain", args={})
    run.count_from(time.monotonic() - 3600)  # the job started an hour ago
    meta = run.update(step=1)
    assert set(RunKey) <= set(meta) and meta[RunKey.STEP] == 1
    assert 3600 <= meta[RunKey.ELAPSED_S] < 3660 and meta[RunKey.COST_PER_HOUR_USD] == 0.096
    assert meta[RunKey.COST_USD] == pytest.approx(0.096, abs=0.002)
    run.finish(RunState.INTERRUPTED)
    run.close()

    monkeypatch.setenv(COST_PER_HOUR_ENV, "0.192")  # resumed on a bigger instance
    again = RunDir.create(tmp_path, "r", job="pretrain", args={}, resume=True)
    again.count_from(time.monotonic() - 1800)
    meta = again.update(step=2)
    assert 5400 <= meta[RunKey.ELAPSED_S] < 5460 and meta[RunKey.COST_PER_HOUR_USD] == 0.192
    assert meta[RunKey.COST_USD] == pytest.approx(0.096 + 0.096, abs=0.003)
    again.close()

    monkeypatch.delenv(COST_PER_HOUR_ENV)  # local: no price, no cost
    fresh = RunDir.create(tmp_path, "r", job="pretrain", args={}, overwrite=True)
    meta = fresh.update(step=0)
    assert meta[RunKey.ELAPSED_S] < 60 and meta[RunKey.COST_USD] == 0
    assert meta[RunKey.COST_PER_HOUR_USD] == 0
    fresh.close()


@pytest.mark.parametrize("price", ["cheap", "-1", "nan"])
def test_a_price_that_is_not_one_counts_zero(price, monkeypatch, caplog):
    from facts import COST_PER_HOUR_ENV

    monkeypatch.setenv(COST_PER_HOUR_ENV, price)
    with caplog.at_level(logging.WARNING, logger="tinycloud"):
        assert rundir.cost_per_hour() == 0.0
    assert COST_PER_HOUR_ENV in caplog.text
