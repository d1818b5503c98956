"""finetune.py end to end on a tiny GPT-2: loss falls, the run directory is complete, the model
serves (plain weights, chat template), LoRA merges exactly, errors stop before training, and a
run stopped by SIGTERM resumes from its checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from remote.jobs import finetune, rundir
from remote.jobs.prompts import PROMPT_FORMAT_FILE, format_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_data(path, n=48):
    rows = [
        {"instruction": f"What is {i} plus one?", "input": "", "output": f"It is {i + 1}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def argv(model, data, runs, name, *extra):
    return ["--model", str(model), "--dataset", str(data), "--runs-dir", str(runs),
            "--name", name, "--batch-size", "4", "--grad-accum", "1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    data = write_data(tmp / "data.jsonl")
    args = argv(tiny_model_dir, data, tmp / "runs", "sft", "--max-steps", "12", "--lr", "3e-3",
                "--logging-steps", "2", "--eval-steps", "6")  # fmt: skip
    assert finetune.main(args) == 0
    return tmp / "runs" / "sft", args


def test_loss_falls_and_run_dir_is_complete(sft_run):
    path, _ = sft_run
    meta = json.loads((path / "run.json").read_text())
    assert meta["status"] == rundir.COMPLETED and meta["step"] == 12
    assert meta["peak_memory_mb"] > 0 and meta["memory_estimate"]["total_gib"] > 0
    assert meta["examples"] == {"train": 46, "val": 2} and meta["kind"] == "instruction"
    rows = rundir.read_metrics(path / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rundir.read_metrics(path / "metrics.jsonl") if "val_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 and len(val) >= 2 and val[-1] < val[0]
    assert all(r["tokens_per_s"] > 0 for r in train[1:])
    for f in ("loss.png", "manifest.sha256", "model/model.safetensors"):
        assert (path / f).is_file(), f
    assert not (path / finetune.CHECKPOINTS).exists()


def test_model_dir_serves_with_its_chat_template(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = sft_run[0] / "model"
    AutoModelForCausalLM.from_pretrained(model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "### Instruction" in config["chat_template"]  # where TGI reads it
    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "What is 3 plus one?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == format_prompt("What is 3 plus one?")
    assert (model_dir / PROMPT_FORMAT_FILE).is_file()


def test_existing_run_is_never_overwritten(sft_run, capsys):
    path, args = sft_run
    before = (path / "model" / "model.safetensors").read_bytes()
    assert finetune.main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert (path / "model" / "model.safetensors").read_bytes() == before


def test_user_errors_stop_before_any_run_dir(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    runs = tmp_path / "runs"
    assert finetune.main(argv(tiny_model_dir, data, runs, "a", "--columns", "instruction=q")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "question, answer" in err and "--columns" in err
    assert finetune.main(argv(tiny_model_dir, tmp_path / "nope.jsonl", runs, "b")) == 1
    assert "no such file" in capsys.readouterr().err
    assert finetune.main(argv(tmp_path / "no-model", data, runs, "c")) == 1
    assert "could not load model" in capsys.readouterr().err
    data = write_data(tmp_path / "ok.jsonl", 8)
    assert finetune.main(argv(tiny_model_dir, data, runs, "d", "--memory-limit-gb", "0.01")) == 1
    err = capsys.readouterr().err
    assert "this run needs about" in err and "0.01 GiB" in err and "Traceback" not in err
    assert not runs.exists()


def test_lora_merges_into_a_plain_gpt2(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = finetune.add_lora(GPT2LMHeadModel.from_pretrained(tiny_model_dir), 4, 8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = GPT2LMHeadModel.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3)
    finetune.save_model(model, tok, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    runs = tmp_path / "runs"
    args = argv(tiny_model_dir, data, runs, "long", "--max-steps", "5000", "--save-steps", "3",
                "--eval-steps", "1000", "--logging-steps", "1")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "remote.jobs.finetune", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    ckpts = runs / "long" / finetune.CHECKPOINTS
    try:
        deadline = time.time() + 120
        while finetune.last_complete_checkpoint(ckpts) is None and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    meta = json.loads((runs / "long" / "run.json").read_text())
    assert meta["status"] == rundir.INTERRUPTED
    stopped = int(finetune.last_complete_checkpoint(ckpts).rsplit("-", 1)[1])
    assert (stopped >= 3 and stopped == meta["step"]) or stopped >= meta["step"]
    # Resume with a finish line just past the checkpoint: it continues, it does not restart.
    target = stopped + 2
    resumed = [*args, "--resume"]
    resumed[resumed.index("5000")] = str(target)
    assert finetune.main(resumed) == 0
    meta = json.loads((runs / "long" / "run.json").read_text())
    assert meta["status"] == rundir.COMPLETED and meta["step"] == target and meta["resumed_at"]
    steps = [r["step"] for r in rundir.read_metrics(runs / "long" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == target  # nothing logged twice
