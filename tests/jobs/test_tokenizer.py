"""remote/jobs/tokenizer.py: the offline byte-level BPE round-trips any text."""

from __future__ import annotations

import logging

import pytest

from remote.jobs.corpus import SHIPPED_CORPUS
from remote.jobs.tokenizer import EOS, load_tokenizer, train_bpe

SAMPLES = [
    "Attention is all you need.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "naïve café, Größe, façade — “quotes” and ‘apostrophes’",
    "emoji: 🤖🚀👩🏽‍💻 and flags 🇫🇷",
    "日本語のテキスト, русский текст, العربية, हिन्दी",
    "code: def f(x): return x ** 2  # 100% ok {}<>[]",
    "",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [f.read_text(encoding="utf-8") for f in sorted(SHIPPED_CORPUS.glob("*.txt"))]


@pytest.fixture(scope="module")
def bpe(texts):
    return train_bpe(texts, vocab_size=1000)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trips_unicode_and_emoji(bpe, text):
    ids = bpe(text, add_special_tokens=False).input_ids
    assert bpe.decode(ids) == text


def test_learns_the_corpus_words_and_keeps_eos(bpe, tmp_path):
    assert bpe.eos_token == EOS and bpe.convert_tokens_to_ids(EOS) == bpe.eos_token_id
    assert len(bpe("Ġattention".replace("Ġ", " "), add_special_tokens=False).input_ids) == 1
    assert len(bpe("🤖", add_special_tokens=False).input_ids) == 4  # bytes, never <unk>
    bpe.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert again.decode(again(text).input_ids) == text


def test_load_tokenizer_falls_back_to_bpe_offline(texts, caplog):
    with caplog.at_level(logging.WARNING, logger="tinycloud.tokenizer"):
        tok = load_tokenizer("gpt2", texts, vocab_size=600)  # HF is offline in the tests
    assert len(tok) <= 600 and tok.eos_token == EOS
    assert "training a 600-token byte-level BPE" in caplog.text
    with pytest.raises(OSError):
        load_tokenizer("gpt2")  # without texts there is nothing to fall back on
