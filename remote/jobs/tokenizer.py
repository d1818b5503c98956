"""Tokenizers for the jobs: GPT-2's when it can be had, else a byte-level BPE trained here.

The course downloads GPT-2's tokenizer from the Hub. Offline (no network, or
``HF_HUB_OFFLINE=1``) we train a byte-level BPE on the corpus itself with ``tokenizers``;
either way the tokenizer is saved with the model, so ``model/`` is a complete Hugging Face
directory that TGI and the native server can load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

EOS = "<|endoftext|>"  # GPT-2's one special token: document separator, BOS and EOS at once

log = logging.getLogger("tinycloud.tokenizer")


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a GPT-2-style byte-level BPE on ``texts`` and wrap it as a transformers tokenizer.

    Byte-level means any UTF-8 text round-trips, emoji included, whatever the vocabulary.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        show_progress=False,  # a bar in train.log/console.log is noise; this takes seconds
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=1024,
    )


def load_tokenizer(name: str, texts: Iterable[str] | None = None, vocab_size: int = 4096):
    """``AutoTokenizer.from_pretrained(name)``; if that fails offline and ``texts`` are
    given, fall back to a BPE trained on them (and say so)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as exc:  # not cached and no network, or not a tokenizer directory
        if texts is None:
            raise
        log.warning(
            "tokenizer %r not available (%s); training a %d-token byte-level BPE on the "
            "corpus instead",
            name,
            str(exc).splitlines()[0],
            vocab_size,
        )
        return train_bpe(texts, vocab_size=vocab_size)
