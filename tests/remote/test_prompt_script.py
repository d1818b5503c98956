"""prompt.sh applies the served model's prompt format (or not, with --raw), run for real.

Against ``python -m serving.server`` with the tiny model (whose ``prompt_format.json`` is the
project's), prompt.sh is rendered as `fab serve` renders it, checked with shellcheck, and run.
What arrived at the server is read back from the server itself: a ``max_new_tokens`` too large
for the 256-token context makes it answer 422 with the prompt's exact token count, which tells
the wrapped prompt from the raw one byte for byte (and the answer to a fitting request is the
same greedy answer `POST /generate` gives to ``format_prompt(text)``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest
from conftest import free_port, start_subprocess_server, stop_subprocess_server

from facts import API_KEY_ENV, PROMPT_FORMAT_FILE
from remote.jobs.prompts import format_prompt
from remote.render import render_prompt_script
from remote.target import Target

KEY = "k3y with 'quotes' and $(dollar)"
TEXT = 'Name three colors. $(touch PWNED) "quoted" `tick`'

pytestmark = pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    port = free_port()
    proc = start_subprocess_server(["--model", str(tiny_model_dir)], port, {API_KEY_ENV: KEY})
    yield f"http://127.0.0.1:{port}"
    stop_subprocess_server(proc)


@pytest.fixture
def rendered(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYCLOUD_RENDERED", str(tmp_path / "rendered"))
    monkeypatch.setenv("TINYCLOUD_HOME", str(tmp_path / "state"))
    return Target(name="dev")


def run(script, *args, cwd):
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=os.environ
    )


def tokens_sent(script, *args, cwd) -> int:
    """How many tokens the server counted in the prompt that prompt.sh sent."""
    r = run(script, *args, "300", cwd=cwd)
    assert r.returncode == 1, r.stdout + r.stderr
    found = re.search(r"Given: (\d+) `inputs`", r.stderr)
    assert found, r.stderr
    return int(found[1])


def test_prompt_sh_sends_the_served_format_unless_raw(server, rendered, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    fmt = json.loads((tiny_model_dir / PROMPT_FORMAT_FILE).read_text())
    script = render_prompt_script(rendered, server, KEY, fmt)
    assert script.stat().st_mode & 0o777 == 0o700
    check = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True)
    assert check.returncode == 0, check.stdout

    count = AutoTokenizer.from_pretrained(tiny_model_dir)
    wrapped = format_prompt(TEXT)
    assert tokens_sent(script, TEXT, cwd=tmp_path) == len(count(wrapped)["input_ids"])
    assert tokens_sent(script, "--raw", TEXT, cwd=tmp_path) == len(count(TEXT)["input_ids"])

    answer = run(script, TEXT, "5", cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    direct = httpx.post(
        f"{server}/generate",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"inputs": wrapped, "parameters": {"max_new_tokens": 5}},
    ).json()
    assert answer.stdout == direct["generated_text"] + "\n"
    assert not (tmp_path / "PWNED").exists()

    # What the README's example shows: the two requests differ only by the format.
    info = httpx.get(f"{server}/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["prompt_format"]["user_prefix"] == fmt["user_prefix"]


def test_no_format_means_the_text_as_typed(server, rendered, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    script = render_prompt_script(rendered, server, KEY, None)
    n = len(AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT)["input_ids"])
    assert tokens_sent(script, TEXT, cwd=tmp_path) == n
    assert tokens_sent(script, "--raw", TEXT, cwd=tmp_path) == n


def test_hostile_format_values_stay_data(server, rendered, tiny_model_dir, tmp_path):
    """A format's strings reach Python as JSON data, never as shell: quotes, $(...), newlines."""
    from transformers import AutoTokenizer

    fmt = {
        "system": "Sys '$(touch PWNED)' \"q\"",
        "separator": "\n\n",
        "user_prefix": "`id` ### Q:\n",
        "user_suffix": "\n### A: \\n $HOME\n",
    }
    script = render_prompt_script(rendered, server, KEY, fmt)
    check = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True)
    assert check.returncode == 0, check.stdout
    expected = fmt["system"] + fmt["separator"] + fmt["user_prefix"] + "hi" + fmt["user_suffix"]
    n = len(AutoTokenizer.from_pretrained(tiny_model_dir)(expected)["input_ids"])
    assert tokens_sent(script, "  hi ", cwd=tmp_path) == n
    assert not (tmp_path / "PWNED").exists()


def test_usage_and_bad_formats(rendered, tmp_path):
    script = render_prompt_script(rendered, f"http://127.0.0.1:{free_port()}", None, None)
    shown = run(script, "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "--raw" in shown.stdout
    assert run(script, "--raw", cwd=tmp_path).returncode == 2
    with pytest.raises(ValueError, match="user_prefix"):
        render_prompt_script(rendered, "http://127.0.0.1:8080", None, {"system": "x"})
    with pytest.raises(ValueError, match="string fields"):
        render_prompt_script(rendered, "http://127.0.0.1:8080", None, {"user_prefix": 3})
