"""What ties a Hugging Face Trainer (finetune's SFT, dpo's DPOTrainer) to the run directory.

- ``MetricsCallback``: every log step becomes a metrics.jsonl row (train rows ``loss``, eval rows
  ``val_loss``, plus whatever else ``keys`` maps) and a progress update in run.json (step,
  max_steps, loss, tokens_per_s, eta_s), which is all ``fab status`` reads.
- ``StopOnSignal``: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and stop
  the Trainer; the job then raises ``Interrupted`` and ``--resume`` picks up from there.
- ``resume_point``: the newest complete Trainer checkpoint, with metrics.jsonl cut back to it.

Only rank 0 holds a RunDir; the others pass ``None`` and write nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from facts import RunKey, duration
from remote.jobs import dist as distlib
from remote.jobs.errors import Interrupted
from remote.jobs.rundir import RunDir
from remote.jobs.signals import StopSignal

# Trainer log keys -> our metrics.jsonl keys; eval rows get ``eval_<key>`` -> ``val_<ours>``.
TRAIN_KEYS: Mapping[str, str] = {"loss": "loss", "learning_rate": "lr"}


class MetricsCallback(TrainerCallback):
    """Write each Trainer log into metrics.jsonl, run.json and train.log; ``trainer`` is set
    after the Trainer exists, so the callback can read its count of real tokens (if it keeps
    one, as finetune's does)."""

    def __init__(self, run: RunDir | None, world: int = 1, keys: Mapping[str, str] = TRAIN_KEYS):
        self.run = run
        self.world = world
        self.keys = keys
        self.trainer: Any = None
        self._mark: tuple[float, int] | None = None  # (time, tokens) at the last log
        self._start: tuple[float, int] | None = None  # (time, step) when this session began

    def _tokens(self) -> int | None:
        seen = getattr(self.trainer, "tokens_seen", None)
        return None if seen is None else int(seen) * self.world

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self._start = (now, state.global_step)
        self._mark = (now, self._tokens() or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not logs:
            return
        if "loss" in logs:
            self._train_row(state, logs)
        if "eval_loss" in logs:
            self._eval_row(state.global_step, logs)

    def _train_row(self, state, logs: dict[str, float]) -> None:
        now, step = time.perf_counter(), state.global_step
        row: dict[str, Any] = {"step": step}
        row.update({ours: logs[k] for k, ours in self.keys.items() if k in logs})
        row["loss"] = round(float(logs["loss"]), 5)
        tokens = self._tokens()
        if tokens is not None:
            t0, tok0 = self._mark or (now, tokens)
            row["tokens_per_s"] = round((tokens - tok0) / (now - t0), 1) if now > t0 else 0.0
            self._mark = (now, tokens)
        start_t, start_step = self._start or (now, step)
        done = step - start_step
        eta = (state.max_steps - step) * (now - start_t) / done if done > 0 else None
        self.run.append_metrics(row)
        progress = {k: v for k, v in row.items() if k != "lr"}
        timing = {RunKey.MAX_STEPS: state.max_steps, RunKey.ETA_S: eta and round(eta, 1)}
        self.run.update(**timing, **progress)
        self.run.log(progress_line(row, state.max_steps, eta))

    def _eval_row(self, step: int, logs: dict[str, float]) -> None:
        row: dict[str, Any] = {"step": step}
        for key, ours in self.keys.items():
            if f"eval_{key}" in logs:
                row[f"val_{ours}"] = logs[f"eval_{key}"]
        row["val_loss"] = val = round(float(logs["eval_loss"]), 5)
        self.run.append_metrics(row)
        best = self.run.read_meta().get(RunKey.BEST_VAL_LOSS)
        best = val if best is None else min(best, val)
        self.run.update(**{RunKey.VAL_LOSS: val, RunKey.BEST_VAL_LOSS: best})
        self.run.log("step %d: val loss %.4f", step, val)


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT: save a checkpoint at the end of this optimizer step, then stop.

    Under torchrun every rank must stop at the same step, or the survivors wait forever in the
    next all-reduce: the flag is max-reduced across ranks once per step.
    """

    def __init__(self, d: distlib.Dist | None = None, signal: StopSignal | None = None):
        self.d = d or distlib.Dist()
        self.signal = signal or StopSignal()  # the job's own, when it installed one already

    @property
    def signum(self) -> int:
        return self.signal.signum

    def installed(self) -> StopSignal:
        """``with stop.installed(): trainer.train()`` catches the signals while it trains (a
        job that handed in its own StopSignal has them caught already)."""
        return self.signal

    def raise_if_stopped(self, **fields: Any) -> None:
        """After ``train()``: if a signal stopped it, end the job as interrupted."""
        if self.signum:
            raise Interrupted(self.signum, **fields)

    def _any_rank_stopping(self) -> bool:
        if not self.d.enabled:
            return bool(self.signum)
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([self.signum])
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and not self.signum:
            self.signal.signum = int(flag.item())
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_stopping():
            control.should_save = True
            control.should_training_stop = True


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-N`` with its trainer_state.json, which the Trainer writes last:
    a kill in the middle of saving leaves the one before it to resume from."""
    done = [
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in out.glob("checkpoint-*")
        if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return str(max(done)[1]) if done else None


def resume_point(out: Path, run: RunDir | None) -> str | None:
    """For ``--resume``: the checkpoint to continue from (None: start at step 0), with the
    metrics rows logged after it dropped, since they will be logged again."""
    last = last_complete_checkpoint(out)
    if last is None:
        if run is not None:
            run.log("--resume: no checkpoint in %s yet; starting from step 0", out)
        return None
    step = int(Path(last).name.rsplit("-", 1)[-1])
    if run is not None:
        run.truncate_metrics_after(step)
        run.log("resuming from %s (step %d)", last, step)
    return last


def progress_line(row: dict[str, Any], max_steps: int, eta: float | None) -> str:
    """The same shape as pretrain's log line: step | loss | lr | tok/s | eta, then extras."""
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}"]
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if eta is not None:
        parts.append(f"eta {duration(eta)}")
    known = {"step", "loss", "lr", "tokens_per_s"}
    parts += [f"{k} {v:.4g}" for k, v in row.items() if k not in known and isinstance(v, float)]
    return " | ".join(parts)
