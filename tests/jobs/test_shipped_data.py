"""The data shipped in remote/jobs/data/: instructions, preference pairs, evaluation prompts.

They are what the offline demo trains and evaluates on, so they must load through the same
code paths the jobs use (dataset.py, evaluate's prompt reader), not just parse as JSON.
"""

from __future__ import annotations

import json
import re

from remote.jobs import dpo, evaluate
from remote.jobs.dataset import INSTRUCTION, PREFERENCE, load_rows

DATA = evaluate.DATA
INSTRUCTIONS = DATA / "instructions.jsonl"


def jsonl(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{path.name} has blank lines"
    return [json.loads(line) for line in lines]


def test_instructions_are_200_plus_unique_alpaca_rows():
    rows = jsonl(INSTRUCTIONS)
    assert len(rows) >= 200
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}, row
        assert all(isinstance(v, str) for v in row.values()), row
        assert row["instruction"].strip() and row["output"].strip(), row
        assert row["output"] == row["output"].strip(), row
    keys = [(r["instruction"].strip().lower(), r["input"].strip().lower()) for r in rows]
    assert len(set(keys)) == len(keys), "duplicate instruction/input"
    assert len({r["output"] for r in rows}) > 0.9 * len(rows)
    # short answers, so a tiny model can learn the format and when to stop
    sentences = [len(re.findall(r"[.!?](?:\s|$)", r["output"])) for r in rows]
    assert sum(n <= 3 for n in sentences) >= 0.95 * len(rows)
    assert max(len(r["output"]) for r in rows) < 300
    # a real mix: some rows carry an input, most do not
    with_input = sum(bool(r["input"]) for r in rows)
    assert 0.15 * len(rows) < with_input < 0.6 * len(rows)


def test_instructions_load_as_instruction_data():
    rows = load_rows(str(INSTRUCTIONS))
    assert rows.kind == INSTRUCTION and len(rows) == len(jsonl(INSTRUCTIONS))
    prompt, completion = rows.examples(eos="<|endoftext|>")[0]
    assert prompt.endswith("### Response:\n") and completion.endswith("<|endoftext|>")


def test_preference_pairs_are_valid_and_usable_for_dpo():
    rows = jsonl(dpo.SHIPPED_PAIRS)
    assert len(rows) >= 30
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}, row
        assert all(isinstance(v, str) and v.strip() for v in row.values()), row
        assert row["chosen"] != row["rejected"], row
    assert len({r["prompt"] for r in rows}) == len(rows)
    loaded = load_rows(str(dpo.SHIPPED_PAIRS), kind=PREFERENCE)
    assert all(dpo.to_pair(r, "<|endoftext|>") for r in loaded.rows)


def test_eval_prompts_read_as_about_ten_prompts():
    prompts = evaluate.read_prompt_file(evaluate.DEFAULT_PROMPTS)
    assert 8 <= len(prompts) <= 20
    assert not any(p.instruction.startswith("#") for p in prompts)
    assert len({p.instruction for p in prompts}) == len(prompts)
