"""The TGI path's scripts and the server's command line.

``prompt.sh`` and ``launch_gpt2.sh`` are rendered, checked with shellcheck, and run for real:
prompt.sh against ``python -m serving.server`` (started as a user would, key from the
environment), launch_gpt2.sh with a fake ``docker`` on PATH that records its arguments while
the native server stands in for TGI on the port.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_helpers import ROOT, start_subprocess_server, stop_subprocess_server

from facts import API_KEY_ENV
from serving import constants as C
from serving.templates import render_launch_script, render_prompt_script, token_limits

KEY = "s3cret key with 'quotes' and $(dollar)"
HOSTILE = "He said \"hi\" \\ back`slash` $(touch PWNED) 'single'\nnew line 😀 ünïcode"

pytestmark = pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing")


@pytest.fixture(scope="module")
def cli_server(tiny_model_dir):
    """``python -m serving.server`` in a subprocess, its key given by environment."""
    from conftest import free_port

    port = free_port()
    proc = start_subprocess_server(["--model", str(tiny_model_dir)], port, {API_KEY_ENV: KEY})
    yield port
    stop_subprocess_server(proc)


def write_script(path, text: str):
    path.write_text(text)
    path.chmod(0o700)
    return path


def shellcheck(path) -> None:
    r = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def launch_kwargs(model_dir, port, **over):
    max_in, max_total = token_limits(256)
    kw = dict(
        model_dir=str(model_dir),
        api_port=port,
        api_key=KEY,
        gpu=False,
        max_input_tokens=max_in,
        max_total_tokens=max_total,
        cors_origins=["null", "http://chat.example:8000"],
    )
    return {**kw, **over}


# --- the server's command line --------------------------------------------------------------------


def test_cli_refuses_a_missing_model_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "serving.server", "--model", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 1
    assert r.stderr.startswith("error: could not load the model") and "Traceback" not in r.stderr


# --- prompt.sh ------------------------------------------------------------------------------------


def run_prompt(script, *args, env=None, cwd=None):
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_prompt_sh_sends_the_prompt_intact(cli_server, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    url = f"http://127.0.0.1:{cli_server}"
    script = write_script(tmp_path / "prompt.sh", render_prompt_script(url=url, api_key=KEY))
    shellcheck(script)
    r = run_prompt(script, HOSTILE, "7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    direct = httpx.post(
        f"{url}/generate",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"inputs": HOSTILE, "parameters": {"max_new_tokens": 7}},
    ).json()
    assert r.stdout == direct["generated_text"] + "\n"  # greedy: the same prompt, same answer
    assert not (tmp_path / "PWNED").exists()
    # The server's own count of the prompt's tokens proves it arrived byte for byte.
    n = len(AutoTokenizer.from_pretrained(tiny_model_dir)(HOSTILE)["input_ids"])
    r = run_prompt(script, HOSTILE, "300", cwd=tmp_path)
    assert r.returncode == 1
    assert (
        "HTTP 422: Input validation error: `inputs` tokens + `max_new_tokens` must be <= 256. "
        f"Given: {n} `inputs`" in r.stderr
    )


def test_prompt_sh_errors_are_clear(cli_server, tmp_path):
    url = f"http://127.0.0.1:{cli_server}"
    keyless = write_script(tmp_path / "p.sh", render_prompt_script(url=url, api_key=None))
    r = run_prompt(keyless, "hi")
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "Bearer" in r.stderr
    r = run_prompt(keyless, "hi", "3", env={API_KEY_ENV: KEY})  # the environment's key
    assert r.returncode == 0, r.stderr
    assert run_prompt(keyless).returncode == 2
    assert "positive integer" in run_prompt(keyless, "hi", "ten").stderr
    from conftest import free_port

    dead = write_script(
        tmp_path / "d.sh", render_prompt_script(url=f"http://127.0.0.1:{free_port()}", api_key=None)
    )
    r = run_prompt(dead, "hi")
    assert r.returncode == 1 and "could not reach" in r.stderr


# --- launch_gpt2.sh -------------------------------------------------------------------------------

FAKE_DOCKER = """#!/usr/bin/env bash
# Records each call as a JSON line, and the --env-file contents if any; plays a healthy daemon.
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_DOCKER_LOG"
prev=""
for arg in "$@"; do  # keep the env file docker was given: what TGI's environment gets
  if [ "$prev" = --env-file ]; then cat "$arg" > "$FAKE_DOCKER_LOG.env"; fi
  prev=$arg
done
case "$1" in
  info) exit 0 ;;
  container) exit 1 ;;  # no earlier container
  inspect) echo "${FAKE_DOCKER_RUNNING:-true}" ;;
  logs) echo "fake TGI log line" ;;
esac
exit 0
"""


def run_launch(script, tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "docker", FAKE_DOCKER)
    log = tmp_path / "docker.log"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DOCKER_LOG": str(log),
        "HOME": str(tmp_path),
        **env,
    }
    r = subprocess.run([str(script)], capture_output=True, text=True, timeout=120, env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return r, calls


@pytest.fixture
def odd_model_dir(tmp_path):
    model = tmp_path / "runs" / "my model $(touch PWNED) 'x'"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"n_positions": 256}')
    return model


def test_launch_script_runs_tgi_with_every_flag(cli_server, tmp_path, odd_model_dir):
    script = write_script(
        tmp_path / "launch_gpt2.sh",
        render_launch_script(**launch_kwargs(odd_model_dir, cli_server)),
    )
    shellcheck(script)
    r, calls = run_launch(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "TGI is up" in r.stdout
    run = next(c for c in calls if c[0] == "run")
    image_at = run.index(C.DEFAULT_IMAGE)
    docker_opts, tgi_args = run[:image_at], run[image_at + 1 :]
    pairs = {(a, b) for a, b in itertools.pairwise(docker_opts)}
    assert "--detach" in docker_opts
    assert {
        ("--name", C.DEFAULT_CONTAINER_NAME),
        ("--restart", "unless-stopped"),
        ("--shm-size", "1g"),
        ("--publish", f"{cli_server}:80"),
        ("--volume", f"{odd_model_dir}:/model"),
        ("--volume", f"{tmp_path}/tgi-data:/data"),
        ("--cpus", str(os.cpu_count())),
    } <= pairs
    assert "--gpus" not in docker_opts
    assert tgi_args[:2] == ["--model-id", "/model"]
    targs = {(a, b) for a, b in itertools.pairwise(tgi_args)}
    assert {
        ("--max-input-tokens", "255"),
        ("--max-total-tokens", "256"),
        ("--cors-allow-origin", "null"),
        ("--cors-allow-origin", "http://chat.example:8000"),
    } <= targs
    # The key goes to TGI as its API_KEY environment variable, never on a command line.
    assert "--env-file" in docker_opts and not any(KEY in arg for arg in run)
    assert (tmp_path / "docker.log.env").read_text() == f"API_KEY={KEY}\n"
    assert not Path(run[run.index("--env-file") + 1]).exists()  # removed once docker has it
    assert "--disable-custom-kernels" in tgi_args
    assert not (tmp_path / "PWNED").exists() and (tmp_path / "tgi-data").is_dir()


def test_launch_script_on_a_gpu_host(cli_server, tmp_path, odd_model_dir):
    text = render_launch_script(
        **launch_kwargs(
            odd_model_dir,
            cli_server,
            gpu=True,
            api_key=None,
            cors_origins=[],
            cpus=4,
            image="registry.example/tgi:custom",
        )
    )
    script = write_script(tmp_path / "launch_gpt2.sh", text)
    shellcheck(script)
    r, calls = run_launch(script, tmp_path)
    assert r.returncode == 0, r.stderr
    run = next(c for c in calls if c[0] == "run")
    assert run[run.index("--gpus") + 1] == "all" and run[run.index("--cpus") + 1] == "4"
    assert "registry.example/tgi:custom" in run
    assert "--disable-custom-kernels" not in run and "--api-key" not in run
    assert "--cors-allow-origin" not in run


def test_launch_script_fails_clearly(tmp_path, odd_model_dir):
    from conftest import free_port

    script = write_script(
        tmp_path / "launch_gpt2.sh",
        render_launch_script(**launch_kwargs(odd_model_dir, free_port())),
    )
    r, _ = run_launch(script, tmp_path, TGI_HEALTH_TIMEOUT="1")
    assert r.returncode == 1
    assert "did not answer /health within 1s" in r.stderr and "docker logs -f" in r.stderr
    r, _ = run_launch(script, tmp_path, FAKE_DOCKER_RUNNING="false")
    assert r.returncode == 1 and "stopped before it became healthy" in r.stderr
    assert "fake TGI log line" in r.stderr
    (odd_model_dir / "config.json").unlink()
    r, calls = run_launch(script, tmp_path)
    assert r.returncode == 1 and "config.json missing" in r.stderr and calls == []


def test_every_value_is_quoted_for_the_shell(tmp_path):
    """Render hostile values, source the variable block in bash, read them back unchanged."""
    values = dict(
        model_dir="/a b/$(id)/`x`/'q'",
        api_key='k"$HOME\\',
        data_dir="/d;rm -rf ~",
        image="img:1",
        cors_origins=["null", "http://x.example:1"],
    )
    text = render_launch_script(**{**launch_kwargs("/m", 8080), **values})
    block = text[text.index("MODEL_DIR=") : text.index("\ndie()")]
    probe = block + '\nprintf "%s\\0" "$MODEL_DIR" "$API_KEY" "$DATA_DIR" "${CORS_ORIGINS[@]}"'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split("\0")[:-1] == [
        values["model_dir"],
        values["api_key"],
        values["data_dir"],
        *values["cors_origins"],
    ]
    with pytest.raises(ValueError, match="max_input_tokens < max_total_tokens"):
        render_launch_script(**launch_kwargs("/m", 8080, max_input_tokens=256))
    with pytest.raises(ValueError, match="control characters"):
        render_launch_script(**launch_kwargs("/m", 8080, api_key="a\nb"))
    with pytest.raises(ValueError, match="expose the key"):
        render_launch_script(**launch_kwargs("/m", 8080, cors_origins=["*"]))
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        render_prompt_script(url="ftp://x", api_key=None)
