"""Pretraining text: read it, tokenize it once, keep the tokens as flat binary files.

Text comes from files or folders of ``.txt`` (by default the corpus shipped in
``remote/jobs/data/corpus/``) or from one column of a Hugging Face dataset. Each document is
tokenized, closed with the end-of-text token, and split 90/10 into train and val; the two
streams are written as ``train.bin``/``val.bin`` (``uint16``, as nanoGPT does: GPT-2's 50257
ids fit, at half the size of ``int32``) under a folder named for a digest of the text and the
tokenizer, so a second run or a resume on the same data skips the tokenizing.

    python -c "from remote.jobs.corpus import read_files, SHIPPED_CORPUS; \\
               print(len(read_files([SHIPPED_CORPUS])))"
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from remote.jobs.dataset import TEXT_FILE_BUILDERS, open_dataset
from remote.jobs.errors import JobError

SHIPPED_CORPUS = Path(__file__).resolve().parent / "data" / "corpus"
VAL_FRACTION = 0.1  # the course's 90/10 split
SPLIT_RULE = "v1"  # part of the cache key: bump it if split_documents changes

log = logging.getLogger("tinycloud.corpus")


@dataclass(frozen=True)
class Document:
    source: str  # a file path, or "dataset:column[row]"
    text: str


# --- reading ----------------------------------------------------------------------------------


def read_files(paths: Sequence[str | os.PathLike[str]]) -> list[Document]:
    """Every file named, and every ``*.txt`` under every folder named, in a stable order."""
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise JobError(
                f"corpus path {str(path)!r} does not exist. Check --corpus, or leave it out "
                f"to train on the shipped corpus"
            )
        files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise JobError(f"corpus folder {str(path)!r} holds no .txt files. Add some text")
        for f in files:
            try:
                docs.append(Document(str(f), f.read_text(encoding="utf-8")))
            except UnicodeDecodeError as exc:
                raise JobError(
                    f"corpus file {str(f)!r} is not UTF-8 text ({exc.reason} at byte "
                    f"{exc.start}). Convert it with iconv, or leave it out"
                ) from None
    return _non_empty(docs, ", ".join(str(p) for p in paths))


def read_hf_dataset(name: str, column: str, split: str = "train") -> list[Document]:
    """One document per row of ``column``.

    ``name`` is a Hub id (``load_dataset(name, split=split)``, the users' case), a local data
    file (``.jsonl/.json/.csv/.parquet/.txt``, read by the matching ``datasets`` builder) or a
    folder written by ``Dataset.save_to_disk``.
    """
    ds = _load_dataset(name, split)
    if column not in ds.column_names:
        raise JobError(
            f"dataset {name!r} has no column {column!r}; its columns are "
            f"{', '.join(ds.column_names)}. Pass --text-column with the one holding the text"
        )
    texts = ds[column]
    docs = [Document(f"{name}:{column}[{i}]", t) for i, t in enumerate(texts) if isinstance(t, str)]
    return _non_empty(docs, f"dataset {name!r} column {column!r}")


def _load_dataset(name: str, split: str):
    splits = open_dataset(name, builders=TEXT_FILE_BUILDERS)
    if split not in splits:
        raise JobError(
            f"dataset {name!r} has no split {split!r}; it has: {', '.join(splits)}. Pass --hf-split"
        )
    return splits[split]


def _non_empty(docs: list[Document], where: str) -> list[Document]:
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise JobError(f"the corpus is empty: {where} holds no text. Give files with text in them")
    return docs


# --- tokenizing and the cache -----------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50257 does); uint32 for larger vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_documents(docs: list[list[int]]) -> tuple[list[int], list[int]]:
    """90/10 into (train, val) token streams.

    A handful of long documents (files) are each cut at 90% of their tokens, so every file's
    subject is in both splits; many documents (dataset rows) go whole, every tenth one to val,
    so no row is cut in two.
    """
    train: list[int] = []
    val: list[int] = []
    if len(docs) >= 10:
        for i, ids in enumerate(docs):
            (val if i % 10 == 9 else train).extend(ids)
        return train, val
    for ids in docs:
        cut = round(len(ids) * (1 - VAL_FRACTION))
        train.extend(ids[:cut])
        val.extend(ids[cut:])
    return train, val


@dataclass(frozen=True)
class TokenCache:
    """Where a tokenized corpus lives and how big each split is."""

    path: str
    digest: str  # of the text, the tokenizer and the split rule: the folder's name
    text_digest: str  # of the text alone: --resume refuses a corpus that changed
    dtype: str
    vocab_size: int
    eos_id: int
    documents: int
    train_tokens: int
    val_tokens: int

    @property
    def train_bin(self) -> Path:
        return Path(self.path) / "train.bin"

    @property
    def val_bin(self) -> Path:
        return Path(self.path) / "val.bin"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_digest(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
    return h.hexdigest()


def fingerprint(docs: list[Document], tokenizer) -> str:
    """Digest of the text, the tokenizer and the split rule: the cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    parts = (SPLIT_RULE, vocab, str(tokenizer.eos_token_id), text_digest(docs))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def encode(tokenizer, texts: list[str], batch: int = 1000) -> list[list[int]]:
    """Token ids of each text, end-of-text appended (the document separator GPT-2 learned)."""
    eos = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        if backend is not None:  # fast path, and no "longer than model_max_length" warnings
            ids = [e.ids for e in backend.encode_batch(chunk, add_special_tokens=False)]
        else:
            ids = [tokenizer.encode(t, add_special_tokens=False) for t in chunk]
        out.extend([*x, eos] for x in ids)
    return out


def build_cache(docs: list[Document], tokenizer, root: Path) -> TokenCache:
    """Tokenize ``docs`` into ``root/<digest>/`` unless an earlier run already did."""
    digest = fingerprint(docs, tokenizer)
    folder = Path(root) / digest[:20]
    meta_file = folder / "meta.json"
    if meta_file.exists():
        cache = TokenCache(**json.loads(meta_file.read_text()))
        log.info(
            "tokens: reusing %s (%d train, %d val)", folder, cache.train_tokens, cache.val_tokens
        )
        return cache
    if tokenizer.eos_token_id is None:
        raise JobError("the tokenizer has no end-of-text token. Use a GPT-2 style tokenizer")
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    if dtype != np.uint16:
        log.info("tokens: vocabulary of %d ids does not fit uint16; storing uint32", vocab)
    train, val = split_documents(encode(tokenizer, [d.text for d in docs]))
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp folder and rename: a killed run, or two runs at once, never leave a
    # half-written cache that a later run would trust.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for name, ids in (("train.bin", train), ("val.bin", val)):
            np.asarray(ids, dtype=dtype).tofile(tmp / name)
        cache = TokenCache(
            path=str(folder),
            digest=digest,
            text_digest=text_digest(docs),
            dtype=dtype.name,
            vocab_size=vocab,
            eos_id=int(tokenizer.eos_token_id),
            documents=len(docs),
            train_tokens=len(train),
            val_tokens=len(val),
        )
        (tmp / "meta.json").write_text(json.dumps(cache.as_dict(), indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another run got there first with the same tokens
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "tokens: %d documents -> %d train, %d val in %s", len(docs), len(train), len(val), folder
    )
    return cache
