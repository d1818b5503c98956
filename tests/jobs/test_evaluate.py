"""evaluate (remote/jobs/evaluate.py, generation.py): the side-by-side report, finish reasons,
perplexity and reward scores, on tiny models built here. In-process: ``main(argv)``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from facts import FinishReason, RunState
from remote.jobs import eval_report, evaluate
from remote.jobs.dataset import load_splits
from remote.jobs.generation import Answer, Settings, token_loss
from remote.jobs.prompts import format_example

CELL_SPLIT = re.compile(r"(?<!\\)\|")


def steer(src: Path, out: Path, eos_logit: float) -> Path:
    """A copy of the tiny model whose every next-token logit is 0 except EOS's: +x makes it
    stop at once, -x makes it never stop. Zeroing ln_f makes the logits ignore the input."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.eos_token_id, 0] = eos_logit
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def talker_and_stopper(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("steered")
    return steer(tiny_model_dir, root / "talker", -20.0), steer(
        tiny_model_dir, root / "stopper", 20.0
    )


def rows_of(table: str) -> list[list[str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in CELL_SPLIT.split(ln)[1:-1]] for ln in lines]


def test_md_cell_keeps_a_cell_a_cell():
    cell = eval_report.md_cell("a | b\nc\r\n<script>x</script>")
    assert "\n" not in cell and "<script>" not in cell
    assert cell == "a \\| b<br>c<br>&lt;script&gt;x&lt;/script&gt;"
    assert eval_report.md_cell("  ") == "*(empty)*"


def test_report_has_a_column_per_model_and_escapes_cells():
    prompts = [evaluate.Prompt("Say | hi", "line one\nline two"), evaluate.Prompt("Count")]
    answers = {
        "base": [
            Answer("x | y\nz", FinishReason.LENGTH, 8, 0.1),
            Answer("1 2 3", FinishReason.LENGTH, 8, 0.1),
        ],
        "fine-tuned": [
            Answer("hi", FinishReason.EOS, 1, 0.1),
            Answer("one|two", FinishReason.EOS, 2, 0.1),
        ],
    }
    summary = {k: evaluate.summarize(v, None) for k, v in answers.items()}
    models = {"base": "gpt2", "fine-tuned": "runs/a/model"}
    report = eval_report.Report(
        name="r",
        models=models,
        rows=[p.row(raw=False) for p in prompts],
        answers=answers,
        summary=summary,
        generation=Settings().describe(),
        raw=False,
    )
    md = eval_report.render_report(report)
    table = rows_of(md.split("## Answers", 1)[1])
    assert table[0] == ["#", "prompt", "base", "fine-tuned"]
    assert len(table) == 2 + len(prompts)  # header, alignment, one row per prompt
    assert all(len(r) == 4 for r in table)
    assert table[2][1] == "Say \\| hi<br><br>line one<br>line two"
    assert table[2][2].startswith("x \\| y<br>z<br>*(length · 8 tokens)*")
    assert table[3][3].startswith("one\\|two<br>*(eos_token")
    top = rows_of(md.split("## Answers", 1)[0])
    assert ["stopped at EOS", "0/2", "2/2"] in top


def test_side_by_side_run_reports_who_stops(talker_and_stopper, tmp_path):
    talker, stopper = talker_and_stopper
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"instruction": "Split | this", "input": "two\nlines"})
        + "\n"
        + json.dumps({"instruction": "Name a colour."})
        + "\n"
    )
    argv = [
        "--model",
        str(stopper),
        "--base",
        str(talker),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "ev",
        "--device",
        "cpu",
    ]
    assert evaluate.main(argv) == 0

    run = tmp_path / "ev"
    md = (run / "report.md").read_text()
    table = rows_of(md.split("## Answers", 1)[1])
    assert table[0] == ["#", "prompt", "base", "fine-tuned"]
    assert [r[0] for r in table[2:]] == ["1", "2"] and all(len(r) == 4 for r in table)
    assert table[2][1] == "Split \\| this<br><br>two<br>lines"
    assert "(length · 6 tokens)" in table[2][2] and "(eos_token · 0 tokens)" in table[2][3]

    rows = [json.loads(x) for x in (run / "report.jsonl").read_text().splitlines()]
    assert {(r["model"], r["finish_reason"], r["new_tokens"]) for r in rows} == {
        ("base", "length", 6),
        ("fine-tuned", "eos_token", 0),
    }
    assert all(r["answer"] == "" for r in rows if r["model"] == "fine-tuned")
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == RunState.COMPLETED and meta["step"] == meta["max_steps"] == 4
    assert meta["summary"]["fine-tuned"]["stopped_at_eos"] == 2
    assert meta["summary"]["base"]["stopped_at_eos"] == 0
    assert "report.md" in (run / "manifest.sha256").read_text()

    # a second run under the same name is refused, clearly, and the first one is untouched
    assert evaluate.main(argv) == 1
    assert (run / "report.md").read_text() == md


def test_stop_sequence_ends_an_answer(talker_and_stopper):
    from remote.jobs.generation import answer, load_lm

    model, tok = load_lm(str(talker_and_stopper[0]))
    free = answer(model, tok, "Hello", Settings(max_new_tokens=6), seed=0)
    assert free.finish_reason == FinishReason.LENGTH and len(free.text) > 2
    stop = free.text[2:4]
    cut = answer(model, tok, "Hello", Settings(max_new_tokens=6, stop=(stop,)), seed=0)
    assert (
        cut.finish_reason == FinishReason.STOP
        and cut.text == free.text[: free.text.find(stop)].strip()
    )
    assert cut.new_tokens < free.new_tokens


def independent_perplexity(model_dir: Path, pairs: list[tuple[str, str]]) -> float:
    """exp(mean NLL of the completion tokens), one unpadded example at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nlls = []
    for prompt, completion in pairs:
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
        nlls += [-float(logp[len(p) + j - 1, t]) for j, t in enumerate(c)]
    return math.exp(sum(nlls) / len(nlls))


def test_perplexity_is_exp_of_mean_token_loss(tiny_model_dir, tmp_path):
    data = tmp_path / "held.jsonl"
    rows = [
        {
            "instruction": f"Say the number {i}.",
            "input": "" if i % 2 else "twice",
            "output": f"The number is {i}." * (1 + i % 3),
        }
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(evaluate.DEFAULT_PROMPTS),
        "--max-steps",
        "1",
        "--max-new-tokens",
        "2",
        "--eval-data",
        str(data),
        "--seed",
        "3",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "ppl",
        "--device",
        "cpu",
    ]
    assert evaluate.main(argv) == 0
    summary = json.loads((tmp_path / "ppl" / "run.json").read_text())["summary"]["fine-tuned"]

    _, held = load_splits(str(data), seed=3)
    pairs = [
        format_example(r["instruction"], r["input"], r["output"], "<|endoftext|>")
        for r in held.rows
    ]
    expected = independent_perplexity(tiny_model_dir, pairs)
    assert summary["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert summary["eval_loss"] == pytest.approx(math.log(expected), rel=1e-3)
    # batching with padding changes nothing either
    from remote.jobs.generation import load_lm

    model, tok = load_lm(str(tiny_model_dir))
    nll1, n1 = token_loss(model, tok, pairs, batch_size=1)
    nll4, n4 = token_loss(model, tok, pairs, batch_size=4)
    assert n1 == n4 == summary["eval_tokens"] and nll1 == pytest.approx(nll4, rel=1e-5)


@pytest.fixture
def tiny_reward_model(tiny_model_dir, tmp_path) -> Path:
    """A random sequence classifier with one output: a reward model in shape only."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    out = tmp_path / "rm"
    GPT2ForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_model_scores_every_answer(tiny_model_dir, tiny_reward_model, tmp_path):
    from remote.jobs.generation import RewardModel

    argv = [
        "--model",
        str(tiny_model_dir),
        "--base",
        str(tiny_model_dir),
        "--max-steps",
        "3",
        "--max-new-tokens",
        "5",
        "--do-sample",
        "--reward-model",
        str(tiny_reward_model),
        "--runs-dir",
        str(tmp_path),
        "--name",
        "rm",
        "--device",
        "cpu",
    ]
    assert evaluate.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "rm" / "report.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["reward"], float) for r in rows)
    rm = RewardModel(str(tiny_reward_model))
    for r in rows:
        assert r["reward"] == pytest.approx(rm.score(r["prompt"], r["answer"]), abs=1e-3)
    summary = json.loads((tmp_path / "rm" / "run.json").read_text())["summary"]
    for label in ("base", "fine-tuned"):
        mine = [r["reward"] for r in rows if r["model"] == label]
        assert summary[label]["mean_reward"] == pytest.approx(sum(mine) / 3, abs=1e-3)
    assert "mean reward" in (tmp_path / "rm" / "report.md").read_text()


def test_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    common = ["--runs-dir", str(tmp_path), "--device", "cpu"]
    assert evaluate.main(["--model", str(tmp_path / "nope"), "--name", "a", *common]) == 1
    assert "could not load model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi"}\n')
    argv = ["--model", str(tiny_model_dir), "--prompts", str(bad), "--name", "b", *common]
    assert evaluate.main(argv) == 1
    assert "bad.jsonl:1: not a JSON object with an 'instruction'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--model", "m", "--do-sample", "--greedy"])
    assert exc.value.code == 2


def test_sigint_keeps_the_answers_and_resume_finishes(talker_and_stopper, tmp_path, monkeypatch):
    """A SIGINT mid-run: exit 130, status interrupted, the answers so far kept; --resume
    answers only the rest."""
    import os
    import signal

    from remote.jobs import generation

    real, calls = generation.answer, []

    def answer_then_sigint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the job's handler is in place: this only sets its flag
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "answer", answer_then_sigint)
    argv = ["--model", str(talker_and_stopper[0]), "--max-steps", "4", "--max-new-tokens", "3",
            "--runs-dir", str(tmp_path), "--name", "int", "--device", "cpu"]  # fmt: skip
    assert evaluate.main(argv) == 130
    run = tmp_path / "int"
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["step"] == 2
    assert len((run / "report.jsonl").read_text().splitlines()) == 2
    assert evaluate.main([*argv, "--resume"]) == 0
    assert len(calls) == 2 + 2  # the resumed run answered only the two prompts left
    rows = [json.loads(x) for x in (run / "report.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert json.loads((run / "run.json").read_text())["status"] == RunState.COMPLETED
