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
from transformers import AutoTokenizer

from facts import COST_PER_HOUR_ENV, RunKey, RunState
from remote.jobs import finetune, rundir
from remote.jobs.models import add_lora, save_model
from remote.jobs.prompts import PROMPT_FORMAT_FILE, format_prompt
from remote.jobs.trainer_callbacks import last_complete_checkpoint

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
    assert meta["status"] == RunState.COMPLETED and meta["step"] == 12
    assert meta["peak_memory_mb"] > 0 and meta["memory_estimate"]["total_gib"] > 0
    assert meta["examples"] == {"train": 46, "val": 2} and meta["kind"] == "instruction"
    rows = rundir.read_metrics(path / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rundir.read_metrics(path / "metrics.jsonl") if "val_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 and len(val) >= 2 and val[-1] < val[0]
    assert all(r["tokens_per_s"] > 0 for r in train[1:])
    assert meta["batching"] == "packed" and meta["precision"] == "fp32"  # the CPU defaults
    assert set(RunKey) <= set(meta)  # every key `fab runs --compare` reads
    assert meta[RunKey.TRAIN_EXAMPLES] == 46 and meta[RunKey.TRAIN_TOKENS] > 46 * 10
    assert meta[RunKey.KEPT_STEP] == meta[RunKey.MAX_STEPS] == 12  # --keep last
    assert meta[RunKey.FINAL_VAL_LOSS] == pytest.approx(val[-1]) == meta[RunKey.VAL_LOSS]
    assert meta[RunKey.BEST_VAL_LOSS] == pytest.approx(min(val))
    assert meta[RunKey.ELAPSED_S] > 0 and meta[RunKey.COST_USD] == pytest.approx(
        meta[RunKey.ELAPSED_S] / 3600 * meta[RunKey.COST_PER_HOUR_USD], abs=1e-4
    )
    for f in ("loss.png", "manifest.sha256", "model/model.safetensors"):
        assert (path / f).is_file(), f
    assert not (path / rundir.TRAINER_CHECKPOINTS).exists()


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
    assert json.loads((path / "run.json").read_text())["status"] == RunState.COMPLETED


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


def test_keep_best_serves_the_best_evaluation_and_costs_its_time(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A learning rate warming up to 0.5 makes each evaluation worse than the one before: with
    --keep best, model/ holds the best one's weights (evaluated again, it scores the best val
    loss), run.json says which step, and the time is priced at $TINYCLOUD_COST_PER_HOUR."""
    from remote.jobs.models import load_tokenizer

    monkeypatch.setenv(COST_PER_HOUR_ENV, "3.6")
    data = write_data(tmp_path / "data.jsonl")
    flags = ("--max-steps", "8", "--lr", "0.5", "--warmup-steps", "8", "--eval-steps", "2")
    args = argv(tiny_model_dir, data, tmp_path, "best", *flags, "--keep", "best")
    assert finetune.main(args) == 0
    run = tmp_path / "best"
    meta = json.loads((run / "run.json").read_text())
    val = {
        r["step"]: r["val_loss"]
        for r in rundir.read_metrics(run / "metrics.jsonl")
        if "val_loss" in r
    }
    best = min(val, key=val.get)
    assert sorted(val) == [2, 4, 6, 8] and best < 8 and val[8] > val[best]
    assert meta[RunKey.KEPT_STEP] == best and meta[RunKey.STEP] == 8
    assert meta[RunKey.BEST_VAL_LOSS] == pytest.approx(val[best])
    assert meta[RunKey.FINAL_VAL_LOSS] == pytest.approx(val[8])
    assert f"model/ holds step {best}'s weights" in (run / "train.log").read_text()

    again = finetune.parse_args([*args[2:], "--model", str(run / "model")])
    tok = load_tokenizer(again.model)
    examples = finetune.prepare_data(again, finetune.read_rows(again), tok, 256)
    targs = finetune.training_arguments(
        again, tmp_path / "ev", finetune.schedule(again, 8, 1), "cpu"
    )
    trainer = finetune.make_trainer(finetune.load_model(again, tok), tok, examples.train,
                                    examples.val, targs)  # fmt: skip
    assert trainer.evaluate()["eval_loss"] == pytest.approx(val[best], rel=1e-4)

    assert meta[RunKey.COST_PER_HOUR_USD] == 3.6 and meta[RunKey.ELAPSED_S] > 0
    assert meta[RunKey.COST_USD] == pytest.approx(meta[RunKey.ELAPSED_S] / 1000, abs=1e-4)


def test_sigterm_while_loading_ends_interrupted_and_resumes(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    # The VM's hard cap sends SIGTERM whenever it comes: here while the weights load, before
    # any step. The job ends as interrupted (not killed, no traceback) and --resume runs it.
    import signal

    real = finetune.load_model

    def load_then_sigterm(c, tok):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(c, tok)

    monkeypatch.setattr(finetune, "load_model", load_then_sigterm)
    data = write_data(tmp_path / "data.jsonl", 16)
    args = argv(tiny_model_dir, data, tmp_path, "cut", "--max-steps", "3")
    assert finetune.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "--resume --name cut" in err and "Traceback" not in err
    meta = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert meta["status"] == RunState.INTERRUPTED and meta[RunKey.ELAPSED_S] > 0
    monkeypatch.setattr(finetune, "load_model", real)
    assert finetune.main([*args, "--resume"]) == 0
    meta = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert meta["status"] == RunState.COMPLETED and meta[RunKey.STEP] == 3


def test_course_batching_pads_every_example_to_max_length(tiny_model_dir, tmp_path):
    # The course recipe's data layout: --batching max-length, every micro-batch as long as
    # --max-length, whatever its examples.
    data = write_data(tmp_path / "data.jsonl", 16)
    args = argv(tiny_model_dir, data, tmp_path, "ml", "--recipe", "course", "--max-steps", "2",
                "--eval-steps", "2", "--save-steps", "2", "--max-length", "64")  # fmt: skip
    c = finetune.parse_args(args)
    assert (c.batching, c.val_fraction, c.keep, c.lr, c.dropout) == (
        "max-length",
        0.1,
        "best",
        1e-5,
        0.1,
    )
    assert finetune.main(args) == 0
    meta = json.loads((tmp_path / "ml" / "run.json").read_text())
    assert meta["examples"] == {"train": 14, "val": 2}  # 90/10 of 16 rows
    assert meta["batching"] == "max-length" and meta[RunKey.KEPT_STEP] == 2


def test_max_length_batching_computes_every_example_at_max_length(tiny_model_dir, tmp_path):
    import dataclasses

    from remote.jobs.models import load_tokenizer
    from remote.jobs.sft_batches import tokenize_examples

    c = finetune.parse_args(["--model", str(tiny_model_dir), "--batching", "max-length",
                             "--max-length", "48", "--max-steps", "2", "--grad-accum", "2",
                             "--device", "cpu"])  # fmt: skip
    tok = load_tokenizer(str(tiny_model_dir))  # pad = EOS
    pairs = [(f"Q{i}: what is {i}?", f" It is {i}." + tok.eos_token) for i in range(16)]
    feats, _ = tokenize_examples(tok, pairs, c.max_length)
    targs = finetune.training_arguments(c, tmp_path, finetune.schedule(c, 16, 1), "cpu")
    targs = dataclasses.replace(targs, eval_strategy="no", save_strategy="no")
    trainer = finetune.make_trainer(finetune.load_model(c, tok), tok, feats, [], targs, pad_to=48)
    trainer.train()
    assert len(trainer.shapes) == 4 and all(shape == (4, 48) for shape in trainer.shapes)


def test_joined_packed_rows_train_the_same_weights(tiny_model_dir, tmp_path):
    # finetune joins a step's packed micro-batches into fewer, longer rows (pack_tokens): the
    # skipped micro-batches compute nothing, the step's gradient and update are the same.
    import dataclasses

    from remote.jobs.models import load_tokenizer
    from remote.jobs.sft_batches import tokenize_examples

    c = finetune.parse_args(["--model", str(tiny_model_dir), "--max-steps", "1",
                             "--device", "cpu", "--lr", "1e-3"])  # fmt: skip
    tok = load_tokenizer(str(tiny_model_dir))
    pairs = [
        (f"Q{i}: what is {i}?", f" It is {i}." * (1 + i % 4) + tok.eos_token) for i in range(16)
    ]
    feats, _ = tokenize_examples(tok, pairs, c.max_length)
    targs = finetune.training_arguments(c, tmp_path, finetune.schedule(c, 16, 1), "cpu")
    targs = dataclasses.replace(targs, eval_strategy="no", save_strategy="no", seed=0, data_seed=0)

    def train(pack_tokens: int, share: bool | None = None):
        model = finetune.load_model(c, tok)
        trainer = finetune.make_trainer(model, tok, feats, [], targs, packing=True,
                                        pack_tokens=pack_tokens, share=share)  # fmt: skip
        trainer.train()
        return trainer, torch.cat([p.detach().flatten() for p in model.parameters()])

    rows, apart = train(0)
    joined, together = train(10**6)
    plain, unshared = train(10**6, share=False)
    assert len(rows.shapes) == 4 and len(joined.shapes) == len(plain.shapes) == 1
    tokens = sum(len(f["input_ids"]) for f in feats)
    assert plain.shapes[0][1] == tokens == joined.tokens_seen == rows.tokens_seen
    # "Q", ":" and " what is" are computed once a row: once in the joined row, 4 times apart
    assert joined.shapes[0][1] < sum(n for _, n in rows.shapes) < tokens
    assert torch.allclose(apart, together, atol=1e-6)
    assert torch.allclose(unshared, together, atol=1e-6)
    assert joined.state.log_history[-1]["train_loss"] == pytest.approx(
        rows.state.log_history[-1]["train_loss"], rel=1e-5
    )


def test_padded_batching_and_bf16_train_too(tiny_model_dir, tmp_path):
    # The alternatives to the defaults: padded micro-batches (re-cut for the least padding) and
    # mixed bf16 on a CPU. Loss still falls; run.json says which ran.
    data = write_data(tmp_path / "data.jsonl", 24)
    extra = ("--max-steps", "8", "--lr", "3e-3", "--logging-steps", "1", "--grad-accum", "2")
    args = argv(tiny_model_dir, data, tmp_path, "p", "--batching", "padded",
                "--precision", "bf16", *extra)  # fmt: skip
    assert finetune.main(args) == 0
    meta = json.loads((tmp_path / "p" / "run.json").read_text())
    assert meta["batching"] == "padded" and meta["precision"] == "bf16"
    loss = [r["loss"] for r in rundir.read_metrics(tmp_path / "p" / "metrics.jsonl") if "loss" in r]
    assert loss[-1] < loss[0]


def test_gpt_neo_base_trains_through_the_same_flags(tiny_model_dir, tmp_path):
    # The course's Part 3 base. GPT-Neo keeps its own attention, so the job pads instead of
    # packing (and says so); the result is a plain GPT-Neo directory.
    import shutil

    from transformers import AutoModelForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

    neo_dir = tmp_path / "neo"
    weights = shutil.ignore_patterns("*.safetensors", "config.json")
    shutil.copytree(tiny_model_dir, neo_dir, ignore=weights)  # the tokenizer, chat template
    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    config = GPTNeoConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], window_size=16,
                          max_position_embeddings=256)  # fmt: skip
    GPTNeoForCausalLM(config).save_pretrained(neo_dir)
    data = write_data(tmp_path / "data.jsonl", 16)
    args = argv(neo_dir, data, tmp_path, "neo", "--max-steps", "4", "--lr", "3e-3")
    assert finetune.main(args) == 0
    meta = json.loads((tmp_path / "neo" / "run.json").read_text())
    assert meta["status"] == RunState.COMPLETED and meta["batching"] == "padded"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "neo" / "model")
    assert type(model).__name__ == "GPTNeoForCausalLM"


def test_precision_flag_maps_to_the_trainer(tiny_model_dir, tmp_path):
    from remote.jobs.errors import JobError

    def targs(*flags, device="cpu"):
        args = finetune.parse_args(["--model", str(tiny_model_dir), *flags])
        return finetune.common_arguments(args, tmp_path, finetune.schedule(args, 8, 1), device)

    assert not targs()["bf16"] and not targs()["fp16"]  # auto on a CPU: fp32, as the course
    assert targs("--precision", "bf16")["bf16"] and not targs("--precision", "bf16")["fp16"]
    with pytest.raises(JobError, match="fp16 needs a GPU"):
        targs("--precision", "fp16")


def test_bf16_hint_follows_the_cpu_flags(sft_run):
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert finetune.cpu_bf16_native() is native
    log = (sft_run[0] / "train.log").read_text()
    assert ("--precision bf16 trains" in log) is native  # told only where it would pay


def test_lora_merges_into_a_plain_gpt2(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = add_lora(GPT2LMHeadModel.from_pretrained(tiny_model_dir), 4, 8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = GPT2LMHeadModel.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3)
    save_model(model, tok, tmp_path / "merged")
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
    ckpts = runs / "long" / rundir.TRAINER_CHECKPOINTS
    try:
        deadline = time.time() + 120
        while last_complete_checkpoint(ckpts) is None and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    meta = json.loads((runs / "long" / "run.json").read_text())
    assert meta["status"] == RunState.INTERRUPTED
    stopped = int(last_complete_checkpoint(ckpts).rsplit("-", 1)[1])
    assert (stopped >= 3 and stopped == meta["step"]) or stopped >= meta["step"]
    # Resume with a finish line just past the checkpoint: it continues, it does not restart.
    target = stopped + 2
    resumed = [*args, "--resume"]
    resumed[resumed.index("5000")] = str(target)
    assert finetune.main(resumed) == 0
    meta = json.loads((runs / "long" / "run.json").read_text())
    assert meta["status"] == RunState.COMPLETED and meta["step"] == target and meta["resumed_at"]
    steps = [r["step"] for r in rundir.read_metrics(runs / "long" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == target  # nothing logged twice


def test_two_jobs_in_one_process_keep_their_own_train_log(sft_run, tmp_path):
    import logging

    from remote.jobs import evaluate

    handlers = list(logging.getLogger("tinycloud").handlers)
    path, _ = sft_run
    argv = ["--model", str(path / "model"), "--max-steps", "1", "--max-new-tokens", "2",
            "--runs-dir", str(tmp_path), "--name", "ev", "--device", "cpu"]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert logging.getLogger("tinycloud").handlers == handlers  # nothing left attached
    ft_log, ev_log = (path / "train.log").read_text(), (tmp_path / "ev" / "train.log").read_text()
    assert "finetune " in ft_log and "step 12/12 | loss" in ft_log and "evaluate:" not in ft_log
    assert "evaluate: 1 prompts" in ev_log and "finetune " not in ev_log


@pytest.mark.parametrize("name", ["adamw", "sgd", "sgd-momentum", "nesterov"])
def test_optimizer_flag_builds_that_optimizer_with_the_lr(tiny_model_dir, tmp_path, name):
    from remote.jobs import dpo

    args = finetune.parse_args(["--model", str(tiny_model_dir), "--optimizer", name, "--lr",
                                "0.0123", "--weight-decay", "0.5", "--device", "cpu",
                                "--runs-dir", str(tmp_path), "--name", "o"])  # fmt: skip
    targs = finetune.training_arguments(args, tmp_path, finetune.schedule(args, 8, 1), "cpu")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sft = finetune.make_trainer(finetune.load_model(args, tok), tok, [], [], targs,
                                optimizer=name)  # fmt: skip
    args.method, args.dataset = "dpo", str(dpo.SHIPPED_PAIRS)
    train, held = dpo.build_pairs(args.dataset, None, tok.eos_token, args.seed)
    sched = finetune.schedule(args, len(train), 1)
    trainer = dpo.build_trainer(args, tok, train, held, tmp_path / "dpo", sched, [])
    for opt in (sft.create_optimizer(), trainer.create_optimizer()):
        assert type(opt).__name__ == ("AdamW" if name == "adamw" else "SGD")
        assert opt.defaults.get("fused") is (True if name == "adamw" else None)
        assert opt.defaults["lr"] == 0.0123
        if name != "adamw":
            assert opt.defaults["momentum"] == (0.0 if name == "sgd" else 0.9)
            assert opt.defaults["nesterov"] == (name == "nesterov")
        decays = sorted(g["weight_decay"] for g in opt.param_groups)
        assert decays == [0.0, 0.5]  # matrices decay; biases and LayerNorms do not


def torchrun(module: str, *args: str) -> None:
    """``torchrun --standalone --nproc_per_node=2 -m module args``: 2 CPU processes, gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", module, *args, "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_finetune_and_evaluate_run_under_torchrun(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from remote.jobs import evaluate

    data, runs = write_data(tmp_path / "data.jsonl"), tmp_path / "runs"
    torchrun("remote.jobs.finetune", *argv(tiny_model_dir, data, runs, "ddp"),
             "--max-steps", "3", "--logging-steps", "1")  # fmt: skip
    assert sorted(p.name for p in runs.iterdir()) == ["ddp"]  # one run dir, named once
    meta = json.loads((runs / "ddp" / "run.json").read_text())
    assert meta["status"] == RunState.COMPLETED and meta["step"] == 3
    rows = [r for r in rundir.read_metrics(runs / "ddp" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: no step twice
    assert (runs / "ddp" / "train.log").read_text().count("model saved to") == 1
    AutoModelForCausalLM.from_pretrained(runs / "ddp" / "model")

    # evaluate: prompts split over the ranks; the same answers and loss as one process
    ev = ["--model", str(runs / "ddp" / "model"), "--base", str(tiny_model_dir),
          "--max-steps", "3", "--max-new-tokens", "4", "--eval-data", str(data),
          "--runs-dir", str(runs)]  # fmt: skip
    torchrun("remote.jobs.evaluate", *ev, "--name", "ev2")
    assert evaluate.main([*ev, "--name", "ev1", "--device", "cpu"]) == 0
    one, two = (json.loads((runs / n / "run.json").read_text()) for n in ("ev1", "ev2"))
    assert two["status"] == RunState.COMPLETED
    for label in ("base", "fine-tuned"):
        assert two["summary"][label]["eval_tokens"] == one["summary"][label]["eval_tokens"]
        assert two["summary"][label]["eval_loss"] == pytest.approx(
            one["summary"][label]["eval_loss"], rel=1e-4
        )

    def answers(name):
        return [
            json.loads(x)["answer"] for x in (runs / name / "report.jsonl").read_text().splitlines()
        ]

    assert answers("ev2") == answers("ev1") and len(answers("ev1")) == 6


@pytest.mark.slow
def test_evaluate_signal_to_one_rank_stops_both(tiny_model_dir, tmp_path):
    # SIGTERM that reaches one torchrun worker only (not the whole group, as fab cancel
    # sends): both ranks stop, rank 0 records the run as interrupted (resumable, what was
    # answered kept), and nothing is left waiting in a collective.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Say something about {i}.\n" for i in range(200)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "remote.jobs.evaluate", "--model", str(tiny_model_dir), "--prompts",
           str(prompts), "--max-new-tokens", "24", "--runs-dir", str(tmp_path), "--name", "ev",
           "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        report = tmp_path / "ev" / "report.jsonl"
        deadline = time.monotonic() + 120
        while not (report.exists() and len(report.read_text().splitlines()) >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    meta = json.loads((tmp_path / "ev" / "run.json").read_text())
    assert meta["status"] == RunState.INTERRUPTED, proc.stderr.read()[-2000:]
    assert 4 <= len(report.read_text().splitlines()) < 200  # what was answered is kept


def worker_pid(parent: int, rank: int) -> int:
    """The torchrun worker (a child of ``parent``) whose RANK is ``rank``, from /proc."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no torchrun worker with RANK={rank} under {parent}")


def test_dropout_flag_sets_every_dropout_module(tiny_model_dir):
    from torch import nn

    from remote.jobs.models import load_tokenizer, set_dropout

    tok = load_tokenizer(str(tiny_model_dir))
    for value in ("0.0", "0.2"):
        args = finetune.parse_args(["--model", str(tiny_model_dir), "--dropout", value])
        model = finetune.load_model(args, tok)
        ps = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
        assert ps == {float(value)}
    with pytest.raises(ValueError, match="dropout"):
        set_dropout(model, 1.5)


def test_progress_line_reads_like_pretrain():
    from remote.jobs.trainer_callbacks import progress_line

    row = {"step": 25, "loss": 5.61274, "lr": 0.0009857, "tokens_per_s": 7385.2}
    line = progress_line(row, 300, eta=3725.0)
    assert line == "step 25/300 | loss 5.6127 | lr 9.86e-04 | 7,385 tok/s | eta 1:02:05"
    assert progress_line({"step": 1, "loss": 2.0}, 3, None) == "step 1/3 | loss 2.0000"
