"""The AWS path end to end, as the README tells a user to walk it, against the test "instance".

`fab setup` → `fab train finetune --follow` → `fab status` → `fab fetch` → `fab serve` →
`fab prompt` → the rendered chat page in headless Chromium. The host comes from a recorded
`pulumi stack output --json` document pointing at a real sshd on loopback (see remote_harness);
the instance id in it is a real moto instance, so the boto3 checks run too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import chat_in_chromium
from remote_harness import (  # noqa: F401 (pytest fixtures)
    fab_fixture,
    moto_fixture,
    sshd_fixture,
    vm_fixture,
)

RUN = "e2e-finetune"
ROWS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."},
    {"instruction": "What is GPT-2?", "input": "", "output": "A small language model."},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
] * 6


@pytest.mark.slow
def test_the_aws_path_in_order(fab, vm, sshd, tiny_model_dir, tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # The job runs as the VM's login user: it reads copies on the VM, as after an upload.
    data, model = sshd.hand_over(data), sshd.hand_over(tiny_model_dir)

    setup = fab(vm, "setup")
    assert setup.code == 0, setup.text
    assert "ready:" in setup.out

    flags = f"--model {model} --dataset {data} --max-steps 3 --batch-size 4"
    train = fab(vm, "train", "finetune", "--name", RUN, "--follow", "--args", flags)
    assert train.code == 0, train.text
    assert f"started finetune {RUN!r}" in train.out

    status = fab(vm, "status")
    assert status.code == 0, status.text
    row = next(line for line in status.out.splitlines() if RUN in line)
    assert "completed" in row and "3/3" in row.replace(" ", ""), status.out

    fetched = fab(vm, "fetch", RUN)
    assert fetched.code == 0, fetched.text
    local = Path(vm["TINYCLOUD_LOCAL_RUNS"]) / RUN
    manifest = (local / "manifest.sha256").read_text().splitlines()
    assert any(line.endswith("model/model.safetensors") for line in manifest)
    assert (local / "model" / "config.json").is_file() and (local / "loss.png").is_file()

    served = fab(vm, "serve", "--run", RUN, "--bind", "127.0.0.1", "--wait", "240")
    try:
        assert served.code == 0, served.text
        asked = fab(vm, "prompt", "Name a primary colour.", "--max-tokens", "6")
        assert asked.code == 0, asked.text
        page = Path(vm["TINYCLOUD_RENDERED"]) / "vmtest" / "chat.html"
        url = json.loads(Path(vm["TINYCLOUD_STACK_OUTPUTS"]).read_text())["api_url"]
        chat_in_chromium(page, url, tmp_path / "e2e-chat.png")
    finally:
        stopped = fab(vm, "serve", "--stop")
    assert stopped.code == 0, stopped.text
