"""The prompt format and the chat template written into models must never drift apart."""

import json

from remote.jobs.prompts import (
    CHAT_TEMPLATE,
    PROMPT_FORMAT,
    PROMPT_FORMAT_FILE,
    format_example,
    format_prompt,
)


def test_chat_template_matches_training_format(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    one_turn = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    assert one_turn == format_prompt("Name a colour.")


def test_multi_turn_follows_prompt_format(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    f = json.loads((tiny_model_dir / PROMPT_FORMAT_FILE).read_text())
    expected = (
        "Be brief."
        + f["separator"]
        + f["user_prefix"]
        + "a"
        + f["user_suffix"]
        + "b"
        + f["eos"]
        + f["separator"]
        + f["user_prefix"]
        + "c"
        + f["user_suffix"]
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    assert f["system"] == PROMPT_FORMAT["system"]


def test_format_example_closes_with_eos():
    prompt, completion = format_example("Add.", "2 and 3", " 5 ", eos="<|endoftext|>")
    assert prompt.endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert completion == "5<|endoftext|>"


def test_chat_template_lives_in_tokenizer_config(tiny_model_dir):
    # TGI 3.1 reads the template from tokenizer_config.json, not from chat_template.jinja.
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
