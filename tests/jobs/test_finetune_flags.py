"""finetune's flags (remote/jobs/finetune_flags.py) and the order of its checks: a bad flag exits 2
before anything is written, DPO refuses what it would ignore, --recipe course sets the handout's
values (typed flags still win), and a bad dataset fails before any model is asked for."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from remote.jobs import finetune
from remote.jobs.finetune_flags import DPO_UNUSED, RECIPES, SHIPPED_PAIRS, Config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def refused(capsys, argv: list[str]) -> str:
    """``finetune.main(argv)`` must stop at the flags (exit 2); its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_dropout_exits_2_at_once_with_no_run_dir(tmp_path):
    # As a user runs it: a real process, its exit code and stderr, and nothing on disk.
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "remote.jobs.finetune", "--dropout", "1.5",
           "--runs-dir", str(runs), "--name", "x"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: --dropout must be in [0, 1), not 1.5" in done.stderr
    assert "Traceback" not in done.stderr and not runs.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-steps", "-1"], "--max-steps cannot be negative"),
        (["--lr", "0"], "--lr and --beta must be positive"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--val-size", "5", "--val-fraction", "0.1"], "--val-size or --val-fraction, not both"),
        (["--columns", "instruction"], "bad --columns entry 'instruction'"),
        (["--resume"], "--resume needs --name"),
        (["--resume", "--overwrite", "--name", "a"], "--resume or --overwrite, not both"),
        (["--name", "../up"], "bad run name '../up'"),
        (["--keep", "best", "--val-size", "0"], "--keep best picks by validation loss"),
        (["--keep", "best", "--eval-steps", "4", "--save-steps", "6"], "a multiple of"),
        (["--memory-limit-gb", "0"], "--memory-limit-gb must be positive"),
        (["--beta", "0.2"], "--method sft does not use --beta"),
    ],
)
def test_unusable_values_exit_2(capsys, argv, message):
    assert message in refused(capsys, argv)


@pytest.mark.parametrize("flag", sorted(DPO_UNUSED))
def test_dpo_refuses_each_flag_it_does_not_use(capsys, flag):
    values = {"batching": "padded", "recipe": "course", "text_column": "t"}
    values.update(dropout="0.1", val_fraction="0.1")
    typed = [f"--{flag.replace('_', '-')}"]
    if flag != "no_memory_check":
        typed.append(values.get(flag, "1"))
    line = refused(capsys, ["--method", "dpo", *typed])
    assert f"--method dpo does not use {typed[0]}" in line and "Drop it" in line


def test_dpo_names_every_refused_flag_and_why(capsys):
    line = refused(capsys, ["--method", "dpo", "--dropout", "0.1", "--val-size", "10"])
    assert "does not use --dropout, --val-size" in line
    assert "dropout off" in line and "holds out 10% of the pairs" in line and "Drop them" in line


def test_defaults_depend_on_method_and_lora():
    assert finetune.parse_args([]).lr == 5e-5 and finetune.parse_args([]).dataset == "alpaca-1k"
    lora = finetune.parse_args(["--lora-rank", "8"])
    assert lora.lr == 2e-4 and lora.lora_alpha == 16
    dpo = finetune.parse_args(["--method", "dpo"])
    assert dpo.lr == 5e-6 and dpo.dataset == str(SHIPPED_PAIRS)
    assert finetune.parse_args(["--lr", "1e-3", "--lora-rank", "8"]).lr == 1e-3


def test_course_recipe_sets_the_handout_values_and_typed_flags_win():
    c = finetune.parse_args(["--recipe", "course"])
    for key, value in RECIPES["course"].items():
        assert getattr(c, key) == value, key
    assert (c.lr, c.warmup_steps, c.max_length, c.batching) == (1e-5, 100, 256, "max-length")
    assert (c.val_fraction, c.eval_steps, c.save_steps, c.keep) == (0.1, 100, 100, "best")
    mine = finetune.parse_args(["--recipe", "course", "--lr", "3e-5", "--dataset", "netflix"])
    assert mine.lr == 3e-5 and mine.dataset == "netflix" and mine.max_length == 256
    assert set(RECIPES["course"]) <= {f for f in Config.__dataclass_fields__}


def test_help_lists_the_recipe(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    out = capsys.readouterr().out
    assert "--recipe course sets (flags given with it still win):" in out
    assert "--lr 1e-05" in out and "--batching max-length" in out and "alpaca-1k" in out


def test_a_bad_dataset_fails_before_any_model_is_asked_for(tmp_path, capsys, monkeypatch):
    """`finetune --dataset nonexistent.jsonl` (model gpt2, which is not here): the dataset error,
    in seconds, with no attempt at the Hub: no socket opened and no loader called."""
    import transformers

    attempts: list[object] = []
    real_connect = socket.socket.connect

    def spy(self, address):
        attempts.append(address)
        return real_connect(self, address)

    def no_loading(*args, **kwargs):
        attempts.append(("from_pretrained", args))
        raise OSError("the test forbids loading a model here")

    monkeypatch.setattr(socket.socket, "connect", spy)
    for cls in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_loading)
    runs = tmp_path / "runs"
    cases = [
        (["--dataset", "nonexistent.jsonl"], "is not a preset and no such file exists"),
        (["--dataset", "alpaca-2k"], "is not a preset and no such file exists"),
        (["--model", "runs/nope/model"], "could not load model 'runs/nope/model'"),
        (["--method", "dpo", "--dataset", str(tmp_path / "none.jsonl")], "no such file exists"),
    ]
    for argv, message in cases:
        start = time.monotonic()
        assert finetune.main([*argv, "--runs-dir", str(runs)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert time.monotonic() - start < 30  # seconds, not a minute of hub retries
    assert attempts == [] and not runs.exists()


def test_bad_pairs_fail_before_the_tokenizer_and_the_run_dir(tmp_path, capsys, monkeypatch):
    from remote.jobs import dpo

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the pairs must be checked before any tokenizer is loaded")

    monkeypatch.setattr(dpo, "load_tokenizer", no_tokenizer)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    runs = tmp_path / "runs"
    assert finetune.main(["--method", "dpo", "--dataset", str(same), "--runs-dir", str(runs)]) == 1
    assert "none of the 1 rows" in capsys.readouterr().err and not runs.exists()
