"""Training windows from a token file, and a thread that loads the next batch early.

A batch is ``batch_size`` random windows of ``block_size + 1`` tokens (inputs, and the same
shifted by one as targets), nanoGPT's ``get_batch``. Which windows is decided by a generator
seeded with ``(seed, stream, rank, step, micro_step)`` and nothing else, so the data order
needs no state of its own: a resumed run asks for step 1000 and gets exactly the batch the
uninterrupted run got, however far the prefetcher had run ahead when it stopped.

Under ``torchrun`` each rank draws only from its own contiguous slice of the training tokens
(DistributedSampler's idea), so the ranks see different data.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_STREAM, VAL_STREAM = 0, 1  # keep train and eval draws independent for the same seed


class Windows:
    """Random windows from a flat token file: this rank's slice of it, or (``shard=False``,
    for evaluation) all of it, still drawn with a rank-specific seed."""

    def __init__(
        self,
        path: Path,
        dtype: str,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        stream: int,
        rank: int = 0,
        world_size: int = 1,
        shard: bool = True,
    ):
        n = int(np.memmap(path, dtype=dtype, mode="r").shape[0])
        self.lo, self.hi = (
            (0, n) if not shard else (n * rank // world_size, n * (rank + 1) // world_size)
        )
        if self.hi - self.lo < block_size + 1:
            raise ValueError(f"{self.hi - self.lo} tokens cannot hold a window of {block_size + 1}")
        self.path, self.dtype = path, dtype
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.stream, self.rank = seed, stream, rank

    def starts(self, *key: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, self.rank, *key])
        return rng.integers(self.lo, self.hi - self.block_size, size=self.batch_size)

    def batch(self, *key: int):
        """(x, y) int64 tensors of shape (batch_size, block_size) for this key."""
        import torch

        # A fresh memmap per batch, as nanoGPT does: one held open for a whole run keeps
        # every page it touched counted against the process and looks like a leak.
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        b = self.block_size
        rows = np.stack([data[i : i + b + 1] for i in self.starts(*key)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def train_keys(start_step: int, max_steps: int, grad_accum: int) -> Iterator[tuple[int, int]]:
    """(step, micro_step) for every micro-batch from ``start_step`` on."""
    for step in range(start_step, max_steps):
        for micro in range(grad_accum):
            yield step, micro


_DONE = object()


class Prefetcher:
    """Runs ``load(*key)`` for each key on a background thread, ``depth`` batches ahead.

    NumPy's copies and torch's pinning release the GIL, so the next batch is cut from the
    memmap (and pinned, on a GPU) while the current one runs forward and backward.
    """

    def __init__(self, load: Callable[..., Any], keys: Iterable[tuple[int, ...]], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(load, iter(keys)), name="prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, load: Callable[..., Any], keys: Iterator[tuple[int, ...]]) -> None:
        try:
            for key in keys:
                if not self._put((key, load(*key))):
                    return
        except BaseException as exc:  # hand it to the consumer, which re-raises it
            self._put((None, exc))
            return
        self._put((None, _DONE))

    def next(self, expected: tuple[int, ...]) -> Any:
        """The batch for ``expected``; the keys must be consumed in the order given."""
        key, item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _DONE or key != expected:
            raise RuntimeError(f"prefetcher out of step: wanted {expected}, got {key}")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
