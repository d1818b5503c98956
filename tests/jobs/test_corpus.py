"""remote/jobs/corpus.py: reading text, the 90/10 split, the uint16 token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from remote.jobs import corpus
from remote.jobs.errors import JobError
from remote.jobs.tokenizer import train_bpe


def test_shipped_corpus_is_big_enough_and_plain_text():
    files = sorted(corpus.SHIPPED_CORPUS.glob("*.txt"))
    assert len(files) >= 5
    assert sum(f.stat().st_size for f in files) >= 30_000
    docs = corpus.read_files([corpus.SHIPPED_CORPUS])
    assert [d.source for d in docs] == [str(f) for f in files]  # stable order
    # Spelled out, the end-of-text token would be tokenized as a document boundary mid-file.
    assert not any("<|endoftext|>" in d.text for d in docs)
    assert all(d.text.isascii() for d in docs)


def test_split_is_90_10_per_file_or_by_whole_rows():
    few = [list(range(100)), list(range(100, 150))]
    train, val = corpus.split_documents(few)
    assert train == [*range(90), *range(100, 145)] and val == [*range(90, 100), *range(145, 150)]
    many = [[i] * 3 for i in range(20)]
    train, val = corpus.split_documents(many)
    assert val == [9, 9, 9, 19, 19, 19] and len(train) == 54


def test_token_dtype_handles_vocabularies_past_uint16():
    assert corpus.token_dtype(50257) == np.uint16
    assert corpus.token_dtype(65536) == np.uint16
    assert corpus.token_dtype(65537) == np.uint32


def test_cache_is_written_once_and_reused(tmp_path):
    docs = corpus.read_files([corpus.SHIPPED_CORPUS])
    tok = train_bpe([d.text for d in docs], vocab_size=400)
    first = corpus.build_cache(docs, tok, tmp_path)
    train = np.fromfile(first.train_bin, dtype=first.dtype)
    val = np.fromfile(first.val_bin, dtype=first.dtype)
    assert first.dtype == "uint16" and (len(train), len(val)) == (
        first.train_tokens,
        first.val_tokens,
    )
    assert 0.09 < len(val) / (len(train) + len(val)) < 0.11
    both = np.concatenate([train, val])
    assert both.max() < len(tok) and (both == tok.eos_token_id).sum() == len(docs)  # one per file
    text = tok.decode(val[:20].tolist())
    assert text.strip() and text in docs[0].text  # val starts inside the first file
    stamp = first.train_bin.stat().st_mtime_ns
    again = corpus.build_cache(docs, tok, tmp_path)
    assert again == first and first.train_bin.stat().st_mtime_ns == stamp
    other = corpus.build_cache(docs[:3], tok, tmp_path)
    assert other.path != first.path and other.text_digest != first.text_digest
    assert not list(tmp_path.glob(".*"))  # no half-built folders left behind


def test_hf_dataset_from_jsonl_and_save_to_disk(tmp_path):
    import datasets

    rows = [{"text": f"document number {i} about attention"} for i in range(4)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = corpus.read_hf_dataset(str(path), "text")
    assert [d.text for d in docs] == [r["text"] for r in rows]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert [d.text for d in corpus.read_hf_dataset(str(saved), "text")] == [r["text"] for r in rows]
    with pytest.raises(JobError, match=r"no column 'body'.*text.*--text-column"):
        corpus.read_hf_dataset(str(path), "body")
    with pytest.raises(JobError, match="could not load dataset"):
        corpus.read_hf_dataset("no-such-user/no-such-dataset", "text")  # offline: a clear error


def test_non_utf8_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(JobError, match="not UTF-8"):
        corpus.read_files([bad])
