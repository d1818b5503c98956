"""The small pure pieces of remote/: probe states, tables, manifests, requirements, the
systemd unit, key masking and the job command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Exit

from remote import probe, report
from remote.fetch import parse_manifest
from remote.launch import job_command
from remote.serve import mask, native_argv, systemd_unit
from remote.sync import ENV_GROUPS, PYPI, local_files, locked_requirements


def _run(root: Path, name: str, pid: int | None, status: str | None, **fields) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if status is not None:
        (d / "run.json").write_text(json.dumps({"status": status, "pid": pid, **fields}))
    return d


def test_probe_tells_running_killed_starting_and_finished_apart(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _run(tmp_path, "alive", os.getpid(), "running", step=5, max_steps=10)
    _run(tmp_path, "crashed", dead.pid, "running", step=3)
    _run(tmp_path, "done", dead.pid, "completed")
    (_run(tmp_path, "booting", None, None) / ".pid").write_text(str(os.getpid()))
    (_run(tmp_path, "never", None, None) / ".pid").write_text(str(dead.pid))
    source = (Path(probe.__file__)).read_text()
    out = subprocess.run(
        [sys.executable, "-c", source, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    doc = json.loads(out)
    states = {r["name"]: r["state"] for r in doc["runs"]}
    assert states == {
        "alive": "running",
        "crashed": "killed",
        "done": "completed",
        "booting": "starting",
        "never": "failed to start",
    }
    assert doc["host"]["cpus"] >= 1 and doc["host"]["disk_total"] > 0


def test_probe_sees_a_zombie_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = 50
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            deadline -= 1
            assert deadline, "child never became a zombie"
            __import__("time").sleep(0.1)
        assert not probe.pid_alive(child.pid)
    finally:
        child.wait()


def test_status_table_and_host_line():
    runs = [
        {
            "name": "ft",
            "job": "finetune",
            "state": "running",
            "step": 40,
            "max_steps": 100,
            "loss": 1.23456,
            "tokens_per_s": 1234.5,
            "eta_s": 3725,
            "elapsed_s": 1810.7,
            "cost_per_hour_usd": 0.112,
            "cost_usd": 0.0563,
        },
        {"name": "pre", "job": "pretrain", "state": "killed", "step": 7, "max_steps": 50},
        {"name": "old", "job": "pretrain", "state": "completed", "elapsed_s": 600},
    ]
    table = report.status_table(runs).splitlines()
    header = ["RUN", "JOB", "STATE", "STEP", "LOSS", "TOKENS/S", "TIME", "COST", "ETA"]
    assert table[0].split() == header
    assert table[1].split() == [
        *("ft", "finetune", "running", "40/100", "1.2346", "1,234", "0:30:10", "$0.06", "1:02:05")
    ]
    assert table[2].split() == ["pre", "pretrain", "killed", "7/50", "-", "-", "-", "-", "-"]
    assert table[3].split() == ["old", "pretrain", "completed", "-", "-", "-", "0:10:00", "-", "-"]
    line = report.host_line(
        {
            "cpus": 2,
            "load": [0.5, 0.25, 0.0],
            "mem_total": 8 * 2**30,
            "mem_available": 6 * 2**30,
            "disk_total": 100 * 2**30,
            "disk_free": 90 * 2**30,
        }
    )
    assert line == (
        "host: 2 CPUs, load 0.50 0.25 0.00 · memory 2.0/8.0 GiB used · disk 10/100 GiB used"
    )


def test_manifest_paths_cannot_leave_the_run_directory():
    good = "a" * 64 + "  model/config.json\n" + "b" * 64 + "  loss.png\n"
    assert parse_manifest(good) == [("a" * 64, "model/config.json"), ("b" * 64, "loss.png")]
    for bad in (
        "a" * 64 + "  ../../.ssh/authorized_keys",
        "a" * 64 + "  /etc/passwd",
        "short  model/x",
    ):
        with pytest.raises(Exit, match="bad line"):
            parse_manifest(bad)


def _pins(text: str) -> dict[str, str]:
    from remote.jobs.lockcheck import pins

    return {r.name: str(r.specifier) for r in pins(text)}


def test_requirements_are_the_locked_train_and_serve_groups_only():
    locked = _pins(locked_requirements(ENV_GROUPS, PYPI))
    assert {"torch", "transformers", "fastapi", "uvicorn", "peft"} <= locked.keys()
    assert not locked.keys() & {"pytest", "moto", "ruff", "fabric", "pulumi", "boto3"}
    assert not locked.keys() & {"tensorboard", "mlflow-skinny", "wandb"}  # only when tracked
    assert all(spec.startswith("==") for spec in locked.values()), locked
    assert "--hash=sha256:" in locked_requirements(ENV_GROUPS, PYPI)


def test_a_torch_backend_keeps_torchs_version_and_brings_its_own_cuda_runtime():
    text = locked_requirements(ENV_GROUPS, "cpu")
    pinned = _pins(text)
    assert pinned["torch"] == _pins(locked_requirements(ENV_GROUPS, PYPI))["torch"]
    assert not [n for n in pinned if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    torch_line = next(e for e in text.split("\n") if e.startswith("torch=="))
    assert "hash" not in torch_line  # the CPU build is another file than PyPI's
    with_tracker = _pins(locked_requirements((*ENV_GROUPS, "tensorboard"), "cpu"))
    assert "tensorboard" in with_tracker


def test_shipped_files_are_jobs_and_serving_without_caches():
    files = local_files()
    assert "remote/__init__.py" in files and "remote/jobs/rundir.py" in files
    assert "serving/constants.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not [
        f
        for f in files
        if f.startswith("remote/") and f.count("/") == 1 and f != "remote/__init__.py"
    ], "the control side must not be shipped"


def test_systemd_unit_restarts_and_keeps_the_key_out_of_the_command_line():
    argv = native_argv(
        "/home/ubuntu/tinycloud/.venv/bin/python",
        ["--model", "m=/home/ubuntu/my runs/m"],
        bind="0.0.0.0",
        port=8080,
        quantize="int8",
        gpu=False,
    )
    unit = systemd_unit(
        argv,
        user="ubuntu",
        workdir="/home/ubuntu/tinycloud",
        env_file="/home/ubuntu/tinycloud/serve/serve.env",
    )
    assert "Restart=on-failure" in unit and "WantedBy=multi-user.target" in unit
    assert '--model "m=/home/ubuntu/my runs/m"' in unit  # quoted for systemd's own parser
    assert "--quantize int8" in unit and "--cors-origin null" in unit
    assert "EnvironmentFile=/home/ubuntu/tinycloud/serve/serve.env" in unit
    assert "api-key" not in unit


def test_mask_shows_too_little_to_use():
    key = "Zq3" + "x" * 40
    masked = mask(key)
    assert masked.startswith("Zq3x…") and key not in masked and "43 chars" in masked


def test_job_command_plain_and_under_torchrun():
    assert job_command("py", "finetune", "ft", ["--limit", "8"], resume=True, nproc=0) == [
        "py",
        "-m",
        "remote.jobs.finetune",
        "--name",
        "ft",
        "--limit",
        "8",
        "--resume",
    ]
    assert job_command("py", "pretrain", "p", [], resume=False, nproc=2)[:5] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
    ]


def test_tgi_launch_script_is_rendered_for_the_model_and_needs_docker(tmp_path, monkeypatch):
    from remote.render import render_launch_script
    from remote.runner import LocalRunner
    from remote.serve import start_tgi

    script = render_launch_script(
        model_dir="/home/ubuntu/tinycloud/runs/ft/model",
        api_port=8080,
        api_key="k3y'quote",
        gpu=False,
        n_positions=256,
    )
    assert "/home/ubuntu/tinycloud/runs/ft/model" in script
    assert "255" in script and "256" in script  # max input / total tokens from n_positions
    assert "'k3y'\"'\"'quote'" in script  # shell-quoted, never bare
    bare = tmp_path / "bin"  # a host without Docker: a PATH with nothing on it (CI installs
    bare.mkdir()  # docker.io in /usr/bin for the booted-VM tests, so /usr/bin will not do)
    monkeypatch.setenv("PATH", str(bare))
    with pytest.raises(Exit, match="--engine tgi needs Docker"):
        start_tgi(LocalRunner(tmp_path / "work"), script)
