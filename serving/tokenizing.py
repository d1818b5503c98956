"""Tokenizing off the event loop: TGI's validation workers, and what /tokenize answers.

Two megabytes of text take seconds to tokenize, and the ``transformers`` wrapper holds the GIL
while it builds Python lists of a million ids: on the event loop, three such requests made
``/health`` take 3.6 s instead of 20 ms. So:

- sizes are checked before tokenizing. A token never covers more characters than the longest
  entry of the vocabulary (byte-level BPE: one vocabulary character per byte), so an input longer
  than ``max_input_tokens`` of those can never fit: it is refused at once with TGI's message,
  its count given as "at least N";
- tokenizing runs in worker threads (TGI's ``--validation-workers``, 2) through the Rust
  tokenizer's batch call, which releases the GIL, and counts and truncates in Rust, without a
  Python list of the whole input;
- long inputs (64 K characters and up, e.g. with ``truncate``) wait in a lane of their own, one
  at a time and at most four waiting (429 beyond that), so they never delay ordinary requests.

``/tokenize`` answers about twenty bytes of JSON per character of input (TGI answers 41 MB for
a 2 MB input); here it lists at most ``TOKENIZE_CONTEXTS`` contexts' worth of tokens and refuses
more with a 422 that says so. Offsets are byte offsets into the UTF-8 input, as TGI's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from copy import copy
from typing import Any, TypeVar

from serving import constants as C
from serving.engine import Overloaded
from serving.validation import ValidationError

T = TypeVar("T")


class Workers:
    """Two lanes of validation threads: ordinary inputs, and long ones one at a time."""

    def __init__(self, workers: int = C.VALIDATION_WORKERS) -> None:
        self.count = workers
        self._small = ThreadPoolExecutor(workers, thread_name_prefix="validation")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="validation-long")
        self._large_waiting = 0

    async def run(self, chars: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker; ``chars`` (the input's size) picks the lane."""
        loop = asyncio.get_running_loop()
        if chars < C.LARGE_INPUT_CHARS:
            return await loop.run_in_executor(self._small, fn, *args)
        if self._large_waiting >= C.LARGE_INPUT_WAITING:
            raise Overloaded("Model is overloaded")
        self._large_waiting += 1
        try:
            return await loop.run_in_executor(self._large, fn, *args)
        finally:
            self._large_waiting -= 1

    def close(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)


class Encoder:
    """The model's tokenizer as validation uses it: the Rust tokenizer itself, with neither
    padding nor truncation, so ids match ``tokenizer(text)`` exactly."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.rust = copy(backend) if backend is not None else None
        if self.rust is not None:
            self.rust.no_truncation()
            self.rust.no_padding()
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1

    def at_least(self, text: str) -> int:
        """A lower bound on the number of tokens in ``text``, without tokenizing it."""
        return -(-len(text) // self.max_token_chars)

    def encode(self, text: str, add_special_tokens: bool, truncate: int | None = None) -> list[int]:
        """Ids of ``text``, only the last ``truncate`` of them if given (TGI's truncation)."""
        if self.rust is None:
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            return ids[-truncate:] if truncate else ids
        enc = self.rust.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if truncate and len(enc) > truncate:
            enc.truncate(truncate, direction="left")
        return enc.ids

    def count(self, text: str, add_special_tokens: bool) -> tuple[int, Any]:
        if self.rust is None:
            enc = self.tokenizer(
                text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
            return len(enc["input_ids"]), enc
        enc = self.rust.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return len(enc), enc

    def pieces(self, text: str, add_special_tokens: bool, cap: int) -> list[dict[str, Any]]:
        """TGI's /tokenize list: id, the token's text and its byte offsets; over ``cap``
        tokens, a 422 with the count."""
        n, enc = self.count(text, add_special_tokens)
        if n > cap:
            raise ValidationError(too_long_to_list(str(n), cap))
        if self.rust is None:  # a slow tokenizer: transformers' BatchEncoding
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        else:
            ids, offsets = enc.ids, enc.offsets
        data = text.encode("utf-8")
        to_byte = _byte_offsets(text, data, offsets)
        out = []
        for token, (a, b) in zip(ids, offsets, strict=True):
            start, stop = to_byte[a], to_byte[b]
            piece = data[start:stop].decode("utf-8", errors="replace")
            out.append({"id": token, "text": piece, "start": start, "stop": stop})
        return out


def too_long_to_list(count: str, cap: int) -> str:
    return (
        f"`inputs` has {count} tokens; /tokenize lists at most {cap}. "
        "Count a shorter text (the model reads far fewer)"
    )


def _byte_offsets(text: str, data: bytes, offsets: list[tuple[int, int]]) -> dict[int, int]:
    """Character offset -> UTF-8 byte offset for every offset used, in one forward walk."""
    points = sorted({i for pair in offsets for i in pair})
    if len(data) == len(text):
        return {i: i for i in points}
    out, ci, bi = {}, 0, 0
    for i in points:
        bi += len(text[ci:i].encode("utf-8"))
        ci, out[i] = i, bi
    return out
