"""dataset.py: every preset's formatter on rows shaped like its real dataset, column mapping,
validation hold-out, and the errors a user meets (bad column, bad path, hub offline)."""

import json

import pytest

from remote.jobs import dataset
from remote.jobs.dataset import (
    DIALOGUE,
    INSTRUCTION,
    PRESETS,
    TEXT,
    DatasetError,
    format_dialogue,
    format_instruction,
    format_preference,
    format_text,
    load_rows,
    load_splits,
    map_columns,
    parse_columns,
)
from remote.jobs.prompts import format_prompt

EOS = "<|endoftext|>"

# Rows shaped like each real dataset (same columns, same conventions).
ALPACA_1K = {
    "instruction": "Name three primary colours.",
    "input": "",
    "output": "Red, blue, yellow.",
}
ALPACA = {
    "instruction": "Summarise the text.",
    "input": "GPT-2 is a language model.",
    "output": "It models language.",
    "text": "Below is an instruction...",
}
HH = {
    "chosen": "\n\nHuman: What is a volcano?\n\nAssistant: A mountain that erupts."
    "\n\nHuman: Why?\n\nAssistant: Magma rises from below.",
    "rejected": "\n\nHuman: What is a volcano?\n\nAssistant: A mountain that erupts."
    "\n\nHuman: Why?\n\nAssistant: No idea.",
}
TINYSTORIES = {"text": "Once upon a time, a cat found a red ball."}
NETFLIX = {
    "show_id": "s1",
    "type": "Movie",
    "title": "Dick Johnson Is Dead",
    "director": "Kirsten Johnson",
    "description": "As her father nears the end of his life, a filmmaker stages his death.",
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_preset_maps_its_real_columns():
    samples = {"alpaca-1k": ALPACA_1K, "alpaca": ALPACA, "hh-rlhf": HH,
               "tinystories": TINYSTORIES, "netflix": NETFLIX}  # fmt: skip
    assert set(samples) == set(PRESETS)
    for name, row in samples.items():
        p = PRESETS[name]
        used = map_columns(list(row), p.kind, p.columns, name)
        mapped = {f: row[c] for f, c in used.items()}
        _, completion = dataset.FORMATTERS[p.kind](mapped, EOS)
        assert completion.endswith(EOS) and len(completion) > len(EOS), name
    assert PRESETS["hh-rlhf"].data_dir == "helpful-base"
    assert PRESETS["netflix"].columns["text"] == "description"


def test_instruction_format_is_alpaca_with_eos():
    prompt, completion = format_instruction(ALPACA_1K, EOS)
    assert prompt == format_prompt(ALPACA_1K["instruction"])
    assert completion == "Red, blue, yellow." + EOS
    prompt, _ = format_instruction(ALPACA, EOS)
    assert prompt == format_prompt(ALPACA["instruction"], ALPACA["input"])


def test_text_format_has_no_prompt():
    assert format_text(TINYSTORIES, EOS) == ("", TINYSTORIES["text"] + EOS)


def test_hh_dialogue_renders_like_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, completion = format_dialogue(HH, tok.eos_token)
    msgs = [
        {"role": "user", "content": "What is a volcano?"},
        {"role": "assistant", "content": "A mountain that erupts."},
        {"role": "user", "content": "Why?"},
    ]
    assert prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert completion == "Magma rises from below." + tok.eos_token


def test_preference_pairs_share_the_prompt():
    prompt, chosen, rejected = format_preference(HH, EOS)
    assert prompt.endswith("Why?\n\n### Response:\n")
    assert (chosen, rejected) == ("Magma rises from below." + EOS, "No idea." + EOS)
    row = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    assert format_preference(row, EOS) == (format_prompt("Say hi."), "Hi!" + EOS, "No." + EOS)


def test_local_jsonl_with_column_mapping_and_limit(tmp_path):
    rows = [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(10)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    got = load_rows(str(path), columns="instruction=q,output=a", limit=3)
    assert got.kind == INSTRUCTION and len(got) == 3
    assert got.rows[0] == {"instruction": "Question 0?", "output": "Answer 0."}


def test_csv_parquet_and_text_column(tmp_path):
    import pandas as pd

    pd.DataFrame([NETFLIX] * 4).to_csv(tmp_path / "shows.csv", index=False)
    pd.DataFrame([NETFLIX] * 4).to_parquet(tmp_path / "shows.parquet")
    for name in ("shows.csv", "shows.parquet"):
        got = load_rows(str(tmp_path / name), text_column="description")
        assert got.kind == TEXT and got.examples(EOS)[0] == ("", NETFLIX["description"] + EOS)


def test_kind_is_inferred_from_columns(tmp_path):
    assert load_rows(str(write_jsonl(tmp_path / "a.jsonl", [ALPACA_1K]))).kind == INSTRUCTION
    assert load_rows(str(write_jsonl(tmp_path / "h.jsonl", [HH]))).kind == DIALOGUE
    assert load_rows(str(write_jsonl(tmp_path / "t.jsonl", [TINYSTORIES]))).kind == TEXT


def test_missing_column_names_the_columns_and_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DatasetError) as err:
        load_rows(str(path), columns="instruction=prompt,output=response")
    msg = str(err.value)
    assert "'response'" in msg and "prompt, answer" in msg and "--columns output=COL" in msg
    with pytest.raises(DatasetError, match="--text-column"):
        load_rows(str(path), text_column="body")
    with pytest.raises(DatasetError, match=r"columns prompt, answer.*--columns instruction="):
        load_rows(str(path))


def test_bad_paths_and_specs(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="not a preset"):
        load_rows("alpaca-2k")
    with pytest.raises(DatasetError, match="FIELD=COLUMN"):
        parse_columns("instruction")
    with pytest.raises(DatasetError, match="unknown field"):
        parse_columns("question=q")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"\.jsonl"):
        load_rows(str(tmp_path / "data.txt"))


def test_hub_id_offline_fails_clearly():
    with pytest.raises(DatasetError, match="could not load dataset 'hugginglearners/netflix"):
        load_rows("netflix")


def test_validation_is_held_out_when_the_dataset_has_none(tmp_path):
    rows = [{"text": f"story {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    train, val = load_splits(str(path), seed=1)
    assert (len(train), len(val), val.split) == (38, 2, "held-out")
    assert not {r["text"] for r in train.rows} & {r["text"] for r in val.rows}
    _, val2 = load_splits(str(path), seed=1)
    assert val2.rows == val.rows  # same seed, same hold-out
    _, val3 = load_splits(str(path), val_size=5, limit=20)
    assert len(val3) == 5
