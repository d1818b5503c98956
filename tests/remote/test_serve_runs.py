"""`fab serve --run A --run B --with-base`: several runs from one server, on --target local.

A tiny pretrain, a LoRA fine-tune and a full fine-tune of it, served together: each answers
under its run's name (through the API and `fab prompt --model`), an unknown name gets TGI's 422,
and a set the server would refuse stops `fab serve` before the running server is touched.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from remote_harness import TINY_PRETRAIN, fab_fixture, local_fixture  # noqa: F401 (fixtures)

DATA = ROOT / "remote" / "jobs" / "data" / "instructions.jsonl"
TUNE = f"--model runs/pre/model --dataset {DATA} --max-steps 2 --batch-size 2"


def call(url: str, key: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def train(fab, local, name: str, job: str, args: str) -> None:
    done = fab(local, "train", job, "--name", name, "--follow", "--args", args)
    assert done.code == 0, done.text
    work = Path(local["TINYCLOUD_HOME"]) / "local" / "work" / "runs" / name
    assert json.loads((work / "run.json").read_text())["status"] == "completed", done.text


@pytest.mark.slow
def test_several_runs_from_one_server_each_by_its_name(fab, local):
    train(fab, local, "pre", "pretrain", f"{TINY_PRETRAIN} --block-size 128 --max-steps 2")
    train(fab, local, "ft-lora", "finetune", f"{TUNE} --lora-rank 4")
    train(fab, local, "ft-full", "finetune", TUNE)
    port = free_port()
    try:
        served = fab(
            local, "serve", "--run", "ft-lora", "--run", "ft-full", "--with-base",
            "--port", str(port),
        )  # fmt: skip
        assert served.code == 0, served.text
        # the server's own plan, before it loaded: LoRA over its base, base shared, memory
        assert "serving ft-lora, ft-full, pre (the first is the default)" in served.out
        assert "LoRA rank 4" in served.out and "over pre" in served.out
        assert "memory plan:" in served.out
        url = f"http://127.0.0.1:{port}"
        key = (Path(local["TINYCLOUD_HOME"]) / "local" / "api_key").read_text().strip()
        code, listed = call(url, key, "/v1/models")
        assert code == 200 and [m["id"] for m in listed["data"]] == ["ft-lora", "ft-full", "pre"]
        formats = {m["id"]: m["prompt_format"] for m in listed["data"]}
        assert formats["pre"] is None and formats["ft-full"]["stop"]  # the page reads these
        ask = {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True}}
        for name in ("ft-lora", "ft-full", "pre"):
            code, body = call(url, key, "/generate", {**ask, "parameters": {
                **ask["parameters"], "adapter_id": name}})  # fmt: skip
            assert code == 200 and body["details"]["generated_tokens"] == 3, (name, body)
        code, body = call(url, key, "/generate", {"inputs": "hi", "parameters": {
            "adapter_id": "ft-nope"}})  # fmt: skip
        assert code == 422 and body["error_type"] == "validation"
        assert "'ft-nope' is not served here" in body["error"] and "ft-full" in body["error"]
        # `fab prompt --model` asks any of them, in the format its model learned (none: raw)
        for name in ("ft-full", "pre"):
            asked = fab(local, "prompt", "Name a colour.", "--model", name, "--max-tokens", "3")
            assert asked.code == 0 and not asked.err.strip(), (name, asked.text)
        nope = fab(local, "prompt", "hi", "--model", "ft-nope")
        assert nope.code == 1 and "--model 'ft-nope' is not served" in nope.err
        assert "'ft-lora', 'ft-full', 'pre'" in nope.err
        saved = json.loads((Path(local["TINYCLOUD_HOME"]) / "local" / "served.json").read_text())
        assert saved["runs"] == ["ft-lora", "ft-full"] and saved["run"] == "ft-lora"

        scratch = fab(local, "serve", "--run", "pre", "--with-base")
        assert scratch.code == 1 and "started from no base model" in scratch.err

        # A set the server would refuse stops here, and what is served keeps serving.
        shutil.rmtree(Path(local["TINYCLOUD_HOME"]) / "local" / "work" / "runs" / "pre" / "model")
        refused = fab(local, "serve", "--run", "ft-lora", "--run", "ft-full", "--port", str(port))
        assert refused.code == 1
        assert "the server would refuse these models" in refused.err
        assert "was trained on" in refused.err and "runs/pre/model" in refused.err
        assert call(url, key, "/v1/models")[0] == 200

        for bad, said in [
            (("--run", "ft-full", "--run", "ft-full"), "each run once"),
            (("--run", "ft-full", "--engine", "tgi", "--with-base"), "--engine tgi serves one"),
            (("--run", "ft-gone"), "'ft-gone' has no model/"),
        ]:
            r = fab(local, "serve", *bad)
            assert r.code == 1 and said in r.err, (bad, r.text)
    finally:
        fab(local, "serve", "--stop")
