"""DPO (remote/jobs/dpo.py): the pair data in our format, training that really prefers chosen,
and the flags DPO refuses. Runs go through ``finetune.main``, as a user's do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facts import RunKey, RunState
from remote.jobs import dpo, finetune
from remote.jobs.dataset import DatasetError
from remote.jobs.prompts import format_prompt
from remote.jobs.rundir import RunDir

HH_CHOSEN = (
    "\n\nHuman: What is a GPU?\n\nAssistant: A graphics processor.\n\nHuman: Is it fast?"
    "\n\nAssistant: Yes, for matrix math it is much faster than a CPU."
)
HH_REJECTED = (
    "\n\nHuman: What is a GPU?\n\nAssistant: A graphics processor.\n\nHuman: Is it fast?"
    "\n\nAssistant: No idea."
)


def dpo_argv(model: Path, runs: Path, data: Path, *extra: str) -> list[str]:
    return ["--method", "dpo", "--model", str(model), "--dataset", str(data), "--max-steps", "8",
            "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "1", "--seed", "0",
            "--max-length", "128", "--device", "cpu", "--name", "dpo-test", "--runs-dir",
            str(runs), "--logging-steps", "1", "--save-steps", "1000", *extra]  # fmt: skip


def test_hh_dialogues_become_shared_prompt_and_final_turns():
    eos = "<|endoftext|>"
    pair = dpo.to_pair({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, eos)
    assert pair["chosen"] == "Yes, for matrix math it is much faster than a CPU." + eos
    assert pair["rejected"] == "No idea." + eos
    # the earlier assistant turn is closed by EOS and the prompt ends ready for the answer
    assert "A graphics processor." + eos in pair["prompt"]
    assert pair["prompt"].endswith(format_prompt("Is it fast?").split("\n\n", 1)[1])
    # different histories, or the same answer twice, are not pairs
    other = "\n\nHuman: Hi\n\nAssistant: No."
    assert dpo.to_pair({"chosen": HH_CHOSEN, "rejected": other}, eos) is None
    assert dpo.to_pair({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, eos) is None


def test_prompt_column_is_formatted_as_an_instruction():
    pair = dpo.to_pair({"prompt": "Name a planet.", "chosen": "Mars.", "rejected": "Soup."}, "</s>")
    assert pair == {
        "prompt": format_prompt("Name a planet."),
        "chosen": "Mars.</s>",
        "rejected": "Soup.</s>",
    }


def test_bad_pair_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(
        DatasetError, match=r"no column 'chosen'.*question.*needs chosen/rejected pairs"
    ):
        dpo.build_pairs(str(bad), None, "<|endoftext|>", 0)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(dpo.PreferenceDataError, match="none of the 1 rows"):
        dpo.build_pairs(str(same), None, "<|endoftext|>", 0)


def completion_logprob(model, tok, prompt: str, completion: str) -> float:
    """Sum of log p(completion tokens | prompt), computed here, independently of trl."""
    import torch

    p_ids = tok(prompt)["input_ids"]
    c_ids = tok(prompt + completion + tok.eos_token)["input_ids"][len(p_ids) :]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0, :-1]
    targets = ids[0, 1:]
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(p_ids) - 1 :].sum())


def mean_margin(model_dir: Path, pairs: list[dict]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    margins = [
        completion_logprob(model, tok, format_prompt(p["prompt"]), p["chosen"])
        - completion_logprob(model, tok, format_prompt(p["prompt"]), p["rejected"])
        for p in pairs
    ]
    return sum(margins) / len(margins)


def test_dpo_raises_chosen_over_rejected_margin(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in dpo.SHIPPED_PAIRS.read_text().splitlines()][:8]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = mean_margin(tiny_model_dir, rows)
    assert finetune.main(dpo_argv(tiny_model_dir, tmp_path / "runs", data)) == 0
    run = RunDir(tmp_path / "runs" / "dpo-test")
    after = mean_margin(run.model_dir, rows)

    print(f"margin before {before:.2f}, after {after:.2f}")
    assert after > before + 1.0, (before, after)
    meta = run.read_meta()
    assert meta["status"] == RunState.COMPLETED and meta["step"] == 8
    assert meta[RunKey.TRAIN_EXAMPLES] == 8 and meta[RunKey.KEPT_STEP] == 8
    metrics = run.metrics()
    assert all("loss" in r and "reward_margin" in r for r in metrics if "loss" in r)
    assert metrics[-1]["reward_margin"] > metrics[0]["reward_margin"]
    assert (run.model_dir / "prompt_format.json").is_file()
    assert (run.path / "loss.png").is_file()
    assert not run.trainer_checkpoints.exists()
    listed = (run.path / "manifest.sha256").read_text()
    assert "model/model.safetensors" in listed and "metrics.jsonl" in listed


def test_sigterm_via_finetune_main_is_interrupted_and_resumes(tiny_model_dir, tmp_path, capsys):
    """finetune --method dpo: a SIGTERM saves a checkpoint and exits 143 with status
    interrupted (no traceback); --resume finishes the run from there."""
    import os
    import signal
    import threading
    import time

    from remote.jobs.rundir import read_metrics

    argv = ["--method", "dpo", "--model", str(tiny_model_dir), "--runs-dir", str(tmp_path),
            "--name", "d", "--batch-size", "4", "--grad-accum", "1", "--max-length", "128",
            "--lr", "1e-3", "--logging-steps", "1", "--device", "cpu"]  # fmt: skip
    run, done = tmp_path / "d", threading.Event()

    def term_at_step_2() -> None:
        deadline = time.time() + 120
        while not done.is_set() and time.time() < deadline:
            if any(r.get("step", 0) >= 2 for r in read_metrics(run / "metrics.jsonl")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    threading.Thread(target=term_at_step_2, daemon=True).start()
    try:
        code = finetune.main([*argv, "--max-steps", "1000"])
    finally:
        done.set()
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err and "--resume --name d" in err
    meta = json.loads((run / "run.json").read_text())
    stopped, first = meta["step"], meta[RunKey.ELAPSED_S]
    assert meta["status"] == RunState.INTERRUPTED and stopped >= 2 and first > 0
    assert (run / "checkpoints" / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    assert finetune.main([*argv, "--max-steps", str(stopped + 2), "--resume"]) == 0
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == RunState.COMPLETED and meta["step"] == stopped + 2
    assert set(RunKey) <= set(meta) and meta[RunKey.ELAPSED_S] > first  # both sessions
    assert meta[RunKey.FINAL_VAL_LOSS] is not None and meta[RunKey.BEST_VAL_LOSS] is not None
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == stopped + 2  # nothing logged twice


def test_keep_best_picks_the_lowest_held_out_dpo_loss(tiny_model_dir, tmp_path):
    """The shipped 32 pairs hold out 3; a learning rate warming up to 0.3 makes the later
    evaluations worse, and --keep best keeps the step with the lowest DPO val loss."""
    argv = dpo_argv(tiny_model_dir, tmp_path, dpo.SHIPPED_PAIRS, "--keep", "best")
    argv[argv.index("--save-steps") + 1] = "2"
    argv[argv.index("3e-3")] = "0.3"
    assert finetune.main([*argv, "--eval-steps", "2", "--warmup-steps", "8"]) == 0
    run = RunDir(tmp_path / "dpo-test")
    meta = run.read_meta()
    val = {r["step"]: r["val_loss"] for r in run.metrics() if "val_loss" in r}
    assert sorted(val) == [2, 4, 6, 8] and meta[RunKey.TRAIN_EXAMPLES] == 29
    assert meta[RunKey.KEPT_STEP] == min(val, key=val.get) < 8 and val[8] > min(val.values())
    assert meta[RunKey.BEST_VAL_LOSS] == pytest.approx(min(val.values()))
    assert meta[RunKey.FINAL_VAL_LOSS] == pytest.approx(val[8])


def test_too_few_pairs_for_keep_best_is_refused_before_the_run_dir(
    tiny_model_dir, tmp_path, capsys
):
    rows = [json.loads(line) for line in dpo.SHIPPED_PAIRS.read_text().splitlines()][:5]
    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert finetune.main(dpo_argv(tiny_model_dir, tmp_path / "runs", data, "--keep", "best")) == 1
    err = capsys.readouterr().err
    assert "--keep best picks the model by validation loss" in err and "from 10 on" in err
    assert not (tmp_path / "runs").exists()
