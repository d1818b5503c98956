"""remote/jobs/windows.py: windows that depend only on their key, split by rank, prefetched."""

from __future__ import annotations

import numpy as np
import pytest

from remote.jobs.windows import Prefetcher, Windows, train_keys


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def windows(path, **kw):
    args = {"block_size": 16, "batch_size": 4, "seed": 7, "stream": 0, **kw}
    return Windows(path, "uint16", **args)


def test_targets_are_inputs_shifted_by_one_and_keys_repeat(tokens):
    w = windows(tokens)
    x, y = w.batch(3, 0)
    assert x.shape == y.shape == (4, 16) and str(x.dtype) == "torch.int64"
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    again, _ = windows(tokens).batch(3, 0)
    assert (again == x).all()  # no hidden state: a resumed run gets the same batch
    other, _ = w.batch(3, 1)
    assert not (other == x).all()


def test_each_rank_draws_from_its_own_slice(tokens):
    r0, r1 = windows(tokens, rank=0, world_size=2), windows(tokens, rank=1, world_size=2)
    for step in range(20):
        _, y0 = r0.batch(step, 0)
        x1, _ = r1.batch(step, 0)
        assert y0.max() < 500 <= x1.min()
    full = windows(tokens, rank=1, world_size=2, shard=False)
    assert full.lo == 0 and full.hi == 1000


def test_too_short_for_a_window(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="cannot hold a window of 17"):
        windows(path)


def test_prefetcher_yields_in_order_and_reraises():
    keys = list(train_keys(2, 4, 2))
    assert keys == [(2, 0), (2, 1), (3, 0), (3, 1)]
    p = Prefetcher(lambda s, m: s * 10 + m, keys)
    assert [p.next(k) for k in keys] == [20, 21, 30, 31]
    p.close()

    def boom(step, micro):
        raise RuntimeError("disk gone")

    p = Prefetcher(boom, keys)
    with pytest.raises(RuntimeError, match="disk gone"):
        p.next((2, 0))
    p.close()
