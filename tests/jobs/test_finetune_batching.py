"""batching.py: the loss falls on response tokens (EOS included) and nowhere else; padding and
packing change nothing about each example's loss; lm_head on loss positions only gives exactly
the loss of full logits."""

import pytest
import torch

from remote.jobs.batching import (
    IGNORE,
    FlattenBatch,
    PadToLongest,
    response_loss,
    tokenize_examples,
)
from remote.jobs.presets import format_instruction


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return tok, model


ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say something long.", "input": "", "output": "word " * 30},
]


def features(tok):
    pairs = [format_instruction(r, tok.eos_token) for r in ROWS]
    return pairs, tokenize_examples(tok, pairs, max_length=200)[0]


def test_labels_cover_the_response_and_eos_only(tiny):
    tok, _ = tiny
    pairs, feats = features(tok)
    for (prompt, completion), f in zip(pairs, feats, strict=True):
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert f["labels"][:n_prompt] == [IGNORE] * n_prompt
        response = f["labels"][n_prompt:]
        assert IGNORE not in response and response == f["input_ids"][n_prompt:]
        assert response[-1] == tok.eos_token_id  # the model is taught to stop
        assert tok.decode(response) == completion


def test_overlong_examples_are_cut_and_promptonly_dropped(tiny):
    tok, _ = tiny
    pairs, _ = features(tok)
    feats, dropped = tokenize_examples(tok, pairs, max_length=40)
    assert all(len(f["input_ids"]) <= 40 for f in feats)
    assert dropped == sum(len(tok(p)["input_ids"]) >= 40 for p, _ in pairs) > 0


def test_padded_and_packed_batches_give_each_example_its_own_loss(tiny):
    tok, model = tiny
    _, feats = features(tok)
    with torch.no_grad():
        alone = [response_loss(model, PadToLongest(tok.eos_token_id)([f]), reduction="none")
                 for f in feats]  # fmt: skip
        padded = response_loss(model, PadToLongest(tok.eos_token_id)(feats), reduction="none")
        packed = response_loss(model, FlattenBatch()(feats), reduction="none")
    expected = torch.cat(alone)
    # Any attention across examples (or onto padding) would change these numbers.
    assert torch.allclose(padded, expected, atol=1e-5)
    assert torch.allclose(packed, expected, atol=1e-5)
    assert FlattenBatch()(feats)["position_ids"][0].tolist().count(0) == len(feats)


def test_lm_head_on_loss_positions_equals_full_logits_loss(tiny):
    tok, model = tiny
    _, feats = features(tok)
    batch = PadToLongest(tok.eos_token_id)(feats)
    ours = response_loss(model, batch)
    full = model(**batch).loss  # transformers' own: logits everywhere, -100 ignored
    assert torch.allclose(ours, full, atol=1e-6)
    ours.backward()  # and it trains: gradients reach the embeddings through lm_head
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    model.zero_grad()
