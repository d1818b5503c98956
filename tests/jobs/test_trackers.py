"""`--report-to`: a tracker that is not installed stops the job before its run dir exists, with
the command that adds it; an installed one writes into the run. And the lock check `fab setup`
runs on the host (remote/jobs/lockcheck.py)."""

from __future__ import annotations

import os
import sys
from importlib import metadata

import pytest
from test_finetune import argv, write_data

from remote.jobs import finetune, lockcheck, trackers
from remote.jobs.errors import JobError

TRACKER_ENV = (
    "TENSORBOARD_LOGGING_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_ALLOW_FILE_STORE",
    "WANDB_DIR",
    "WANDB_MODE",
    "WANDB_API_KEY",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """None of them set, and whatever prepare() sets is undone after the test."""
    for name in TRACKER_ENV:
        monkeypatch.setenv(name, "")  # records the value to restore (or its absence)
        monkeypatch.delenv(name)


def test_a_tracker_that_is_not_installed_is_refused_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec sees when it is absent
    with pytest.raises(JobError) as err:
        trackers.prepare("tensorboard,wandb", tmp_path / "run")
    text = str(err.value)
    assert "wandb is not installed" in text and "tensorboard" not in text.split(":")[0]
    assert "`fab setup --groups wandb`" in text and "`uv sync --group wandb`" in text


def test_unknown_trackers_are_named(tmp_path):
    with pytest.raises(JobError, match="--report-to comet: not a tracker"):
        trackers.prepare("comet", tmp_path)
    trackers.prepare("none", tmp_path)  # and none is no tracker at all


def test_installed_trackers_write_into_the_run(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r1"
    trackers.prepare("tensorboard,mlflow,wandb", run)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run / "tensorboard")
    assert os.environ["MLFLOW_TRACKING_URI"] == (run / "mlruns").as_uri()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert os.environ["WANDB_DIR"] == str(run) and os.environ["WANDB_MODE"] == "offline"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    trackers.prepare("mlflow,wandb", run)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"  # the user's wins
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and "WANDB_MODE" not in os.environ


def test_finetune_refuses_before_its_run_dir_exists(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    data = write_data(tmp_path / "d.jsonl", 8)
    runs = tmp_path / "runs"
    code = finetune.main(argv(tiny_model_dir, data, runs, "t", "--report-to", "mlflow"))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --report-to mlflow: mlflow is not installed")
    assert not (runs / "t").exists()


# --- the lock check ----------------------------------------------------------------------------


def test_lockcheck_reads_a_uv_export_and_names_every_mismatch(tmp_path, capsys):
    have = metadata.version("packaging")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(
        f"packaging=={have} \\\n    --hash=sha256:{'0' * 64}\n"
        "colorama==0.4.6 ; sys_platform == 'win32'\n"  # not for this platform: skipped
        "pytest==0.0.1\n"
        "no-such-package-here==1.0\n"
    )
    assert lockcheck.main([str(reqs)]) == 1
    out = capsys.readouterr().out
    assert f"pytest: {metadata.version('pytest')} installed, uv.lock pins ==0.0.1" in out
    assert "no-such-package-here: not installed" in out
    assert "packaging" not in out and "colorama" not in out

    reqs.write_text(f"packaging=={have}\ntorch=={metadata.version('torch').split('+')[0]}\n")
    assert lockcheck.main([str(reqs)]) == 0
    assert "all 2 pinned packages installed as locked" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_reports_to_all_three_trackers_inside_its_run_dir(tiny_model_dir, tmp_path):
    """The groups `fab setup --groups` adds, installed here by --all-groups: each tracker works
    offline and leaves its files in the run."""
    data = write_data(tmp_path / "d.jsonl", 8)
    runs = tmp_path / "runs"
    flags = ["--max-steps", "2", "--report-to", "tensorboard,mlflow,wandb"]
    assert finetune.main(argv(tiny_model_dir, data, runs, "tracked", *flags)) == 0
    run = runs / "tracked"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "mlruns").glob("*/*/meta.yaml")), "no MLflow run"
    assert list((run / "wandb").glob("offline-run-*")), "no W&B offline run"
