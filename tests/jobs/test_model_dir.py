"""model/ is written atomically, and only a finished run's whole model counts as served-ready.

A run that failed while saving used to leave config files in model/; `fab serve` without
``--run`` then picked it (probe's ``has_model`` looked at config.json alone) and the server
timed out loading it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from facts import MODEL_DIR, RUN_JSON, RunState
from remote import probe
from remote.jobs.rundir import atomic_dir


def test_atomic_dir_replaces_the_old_directory_whole(tmp_path):
    target = tmp_path / MODEL_DIR
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_dir(target) as tmp:
        assert not (tmp / "stale.bin").exists()
        (tmp / "config.json").write_text("{}")
        assert not (target / "config.json").exists()  # nothing visible until it is complete
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_DIR]  # no temp or old dirs left


def test_a_failed_save_leaves_the_old_directory_or_none(tmp_path):
    target = tmp_path / MODEL_DIR
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed while writing the weights")
    assert list(tmp_path.iterdir()) == []  # no half model, no temp dir
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
        raise RuntimeError("disk full")
    assert json.loads((target / "config.json").read_text()) == {"old": True}


def test_save_model_writes_a_whole_directory_atomically(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remote.jobs.models import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path / "run" / MODEL_DIR
    save_model(model, tok, out)
    assert probe.model_complete(out)
    assert [p.name for p in out.parent.iterdir()] == [MODEL_DIR]


def _run(tmp_path, name: str, status: str, model_files: list[str], src=None):
    run = tmp_path / name
    (run / MODEL_DIR).mkdir(parents=True)
    (run / RUN_JSON).write_text(json.dumps({"status": status, "pid": None}))
    for f in model_files:
        if src is not None and (src / f).exists():
            shutil.copy(src / f, run / MODEL_DIR / f)
        else:
            (run / MODEL_DIR / f).write_text("{}")
    return run


def test_only_a_finished_runs_whole_model_is_served(tmp_path, tiny_model_dir):
    whole = [p.name for p in tiny_model_dir.iterdir()]
    failed = _run(tmp_path, "failed", RunState.FAILED, ["config.json", "generation_config.json"])
    config_only = _run(tmp_path, "config-only", RunState.COMPLETED, ["config.json"])
    interrupted = _run(tmp_path, "interrupted", RunState.INTERRUPTED, whole, tiny_model_dir)
    done = _run(tmp_path, "done", RunState.COMPLETED, whole, tiny_model_dir)
    assert probe.run_info(failed)["has_model"] is False
    assert probe.run_info(config_only)["has_model"] is False
    assert probe.run_info(interrupted)["has_model"] is False
    assert probe.run_info(done)["has_model"] is True
