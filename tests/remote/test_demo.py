"""`fab demo`, the README's quick start, run for real at a small scale; then again, reusing."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from conftest import free_port
from remote_harness import fab_fixture  # noqa: F401 (pytest fixture)


@pytest.mark.slow
def test_demo_runs_every_step_then_reuses_them(fab, tmp_path):
    port = free_port()
    env = {
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_RENDERED": str(tmp_path / "rendered"),
        "TINYCLOUD_LOCAL_RUNS": str(tmp_path / "fetched"),
    }
    args = ("demo", "--scale", "0.02", "--port", str(port))
    work = tmp_path / "state" / "local" / "work" / "runs"
    try:
        first = fab(env, *args)
        assert first.code == 0, first.text
        for step in ("[1/4] pretrain", "[2/4] fine-tune", "[3/4] compare", "[4/4] serve"):
            assert step in first.out, first.out
        for run in ("demo-pretrain", "demo-finetune", "demo-evaluate"):
            assert json.loads((work / run / "run.json").read_text())["status"] == "completed"
        assert "| " in (work / "demo-evaluate" / "report.md").read_text()

        page = tmp_path / "rendered" / "local" / "chat.html"
        assert page.is_file() and f"http://127.0.0.1:{port}" in page.read_text()
        summary = first.out[first.out.index("tinycloud demo is up") :]
        assert str(page) in summary and f"http://127.0.0.1:{port}" in summary
        assert re.search(r"Q: What does a language model predict\?\n\s+A: ", summary)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200

        again = fab(env, *args)
        assert again.code == 0, again.text
        assert again.out.count("reusing the finished run") == 3, again.out
        assert "started " not in again.out and "resumed " not in again.out  # no job ran again
    finally:
        fab({**env, "TINYCLOUD_TARGET": "local"}, "serve", "--stop")
