"""Trainer callbacks that tie a Hugging Face Trainer to the run directory.

- ``MetricsCallback``: every log step becomes a metrics.jsonl row (train rows ``loss``, eval rows
  ``val_loss``) and a progress update in run.json (step, max_steps, loss, tokens_per_s, eta_s),
  which is all ``fab status`` reads.
- ``StopOnSignal``: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and stop,
  so ``--resume`` picks up from there.

Only rank 0 holds a RunDir; the others pass ``None`` and write nothing.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

from remote.jobs import dist as distlib
from remote.jobs.rundir import RunDir


class MetricsCallback(TrainerCallback):
    """Write each Trainer log into metrics.jsonl and run.json; ``trainer`` is set after the
    Trainer exists, so the callback can read its count of real tokens."""

    def __init__(self, run: RunDir | None, world: int = 1):
        self.run = run
        self.world = world
        self.trainer: Any = None
        self._mark: tuple[float, int, int] | None = None  # (time, tokens, step) at last log
        self._start: tuple[float, int] | None = None  # (time, step) when this session began

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "tokens_seen", 0)) * self.world

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._start = (now, state.global_step)
        self._mark = (now, self._tokens(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not logs:
            return
        step = state.global_step
        if "loss" in logs:
            now, tokens = time.perf_counter(), self._tokens()
            t0, tok0, _ = self._mark or (now, tokens, step)
            rate = (tokens - tok0) / (now - t0) if now > t0 else 0.0
            self._mark = (now, tokens, step)
            start_t, start_step = self._start or (now, step)
            done = step - start_step
            eta = (state.max_steps - step) * (now - start_t) / done if done > 0 else None
            row = {
                "step": step,
                "loss": round(float(logs["loss"]), 5),
                "lr": logs.get("learning_rate"),
                "tokens_per_s": round(rate, 1),
            }
            self.run.append_metrics(row)
            self.run.update(
                step=step,
                max_steps=state.max_steps,
                loss=row["loss"],
                tokens_per_s=row["tokens_per_s"],
                eta_s=None if eta is None else round(eta, 1),
            )
        if "eval_loss" in logs:
            val = round(float(logs["eval_loss"]), 5)
            self.run.append_metrics({"step": step, "val_loss": val})
            best = self.run.read_meta().get("best_val_loss")
            self.run.update(val_loss=val, best_val_loss=val if best is None else min(best, val))


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT: save a checkpoint at the end of this optimizer step, then stop.

    Under torchrun every rank must stop at the same step, or the survivors wait forever in the
    next all-reduce: the flag is max-reduced across ranks once per step.
    """

    def __init__(self, d: distlib.Dist | None = None):
        self.d = d or distlib.Dist()
        self.signum: int | None = None

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _any_rank_stopping(self) -> bool:
        if not self.d.enabled:
            return self.signum is not None
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([self.signum or 0])
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_stopping():
            control.should_save = True
            control.should_training_stop = True
