"""The run directory: the contract between a job and everything downstream.

Every job writes ``<runs root>/<run name>/`` with:

- ``run.json``       arguments, versions, seed, status, pid, progress; rewritten atomically.
                     The keys read outside the job are ``facts.RunKey``: progress (step,
                     max_steps, loss, val_loss, tokens_per_s, eta_s), time and money
                     (elapsed_s summed over resumes, cost_per_hour_usd, cost_usd), and what a
                     comparison needs (train_examples, train_tokens, best_val_loss,
                     final_val_loss, kept_step)
- ``train.log``      human-readable log lines (the job's own; the detached launcher sends raw
                     stdout/stderr, progress bars included, to ``console.log``)
- ``metrics.jsonl``  one JSON object per logged step: train rows carry ``loss``, eval rows
                     carry ``val_loss``; both carry ``step``
- ``ckpt.pt``        the last complete checkpoint (written to a temp file, fsynced, renamed);
                     Trainer-based jobs keep ``checkpoints/checkpoint-N/`` instead, removed
                     once the run completes; ``best.pt``: pretrain ``--keep best``'s weights
- ``loss.png``       train and val curves
- ``model/``         a Hugging Face ``save_pretrained`` directory that TGI and the native
                     server both load
- ``manifest.sha256`` ``sha256sum``-format digests of the deliverables, so ``fab fetch`` (and
                     ``sha256sum -c`` on the VM) can verify a download

Time is the wall time of the job's sessions (from its ``main`` to its last write), summed
over resumes; cost is each session's time at the hourly price in ``$TINYCLOUD_COST_PER_HOUR``
(``facts.COST_PER_HOUR_ENV``, set by `fab train` from the stack outputs; 0 when absent).

Only rank 0 of a distributed run writes here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from facts import (
    BEST_WEIGHTS,
    CHECKPOINT,
    CONSOLE_LOG,
    COST_PER_HOUR_ENV,
    LOSS_PLOT,
    MANIFEST,
    METRICS,
    MODEL_DIR,
    RUN_JSON,
    RUN_NAME_RULE,
    RUNS_DIR_NAME,
    RUNS_ENV,
    TRAIN_LOG,
    TRAINER_CHECKPOINTS,
    RunKey,
    RunState,
    is_run_name,
    sha256_file,
)
from remote.jobs.errors import JobError

# Not covered by the manifest: still growing after it is written, or too large to be worth
# shipping back by default (the checkpoint is for resuming on the VM).
MANIFEST_EXCLUDES = frozenset(
    {MANIFEST, TRAIN_LOG, CONSOLE_LOG, CHECKPOINT, BEST_WEIGHTS, RUN_JSON}
)

log = logging.getLogger("tinycloud")


class RunExistsError(JobError, FileExistsError):
    """A run directory already holds a run and neither resume nor overwrite was asked."""


class NoSuchRunError(JobError, FileNotFoundError):
    """--resume named a run that does not exist."""


class BadRunNameError(JobError, ValueError):
    """A run name that is not one path component."""


def runs_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The runs root: the flag if given, else ``$TINYCLOUD_RUNS``, else ``./runs``."""
    return Path(explicit or os.environ.get(RUNS_ENV) or RUNS_DIR_NAME)


def cost_per_hour() -> float:
    """The instance's hourly price from the environment; 0 when unset (a local run) or unusable."""
    raw = os.environ.get(COST_PER_HOUR_ENV, "").strip()
    try:
        price = float(raw) if raw else 0.0
    except ValueError:
        price = -1.0
    if not (math.isfinite(price) and price >= 0):
        log.warning("%s=%r is not a price in USD an hour; counting 0", COST_PER_HOUR_ENV, raw)
        return 0.0
    return price


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    A reader (or a crash, even SIGKILL mid-write) never sees half a file: it sees the old one
    or the new one, and at worst a stray ``.<name>.*.tmp`` is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Fill a temp directory beside ``path``; on success fsync it and rename it into place.

    ``model/`` is either absent, the previous complete directory, or the new complete one — never
    a half-written one that a server would try to load (a crash leaves a ``.model.*.tmp``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():  # a directory cannot be renamed over another: move the old one aside
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            old.rmdir()
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``atomic_open``: ``ckpt.pt`` is always the last complete one."""
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def versions() -> dict[str, str]:
    """Library versions worth recording: a run is only reproducible with them."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "peft", "trl", "tokenizers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


class RunDir:
    """One run's directory. Create with ``RunDir.create``; a job on rank != 0 gets ``None``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.logger = logging.getLogger(f"tinycloud.run.{self.path.name}")
        self._clock: _Clock | None = None  # set by create: this session's time and cost

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str] | None,
        name: str,
        *,
        job: str,
        args: dict[str, Any],
        resume: bool = False,
        overwrite: bool = False,
    ) -> RunDir:
        """Open ``root/name`` for a new run, or for resuming one.

        Refuses to touch an existing run unless ``resume`` (continue it) or ``overwrite``
        (start over) is given: a typo in ``--name`` must never cost somebody a finished model.
        All three refusals are ``JobError``s whose message says which flag to use.
        """
        if not is_run_name(name):
            raise BadRunNameError(f"bad run name {name!r}: use {RUN_NAME_RULE}")
        path = runs_root(root) / name
        run = cls(path)
        exists = (path / RUN_JSON).exists()
        if exists and not (resume or overwrite):
            raise RunExistsError(
                f"run {name!r} already exists at {path}. Pass --resume to continue it, "
                f"--overwrite to start it again from scratch, or choose another --name."
            )
        if resume and not exists:
            raise NoSuchRunError(
                f"--resume: no run {name!r} at {path} to continue; drop --resume to start it."
            )
        if overwrite and exists and not resume:
            clear_run(path)
        path.mkdir(parents=True, exist_ok=True)
        previous = run.read_meta() if resume else {}
        run._clock = _Clock(
            time.monotonic(),
            float(previous.get(RunKey.ELAPSED_S) or 0),
            float(previous.get(RunKey.COST_USD) or 0),
            cost_per_hour(),
        )
        meta = {
            **dict.fromkeys(RunKey),  # every key readers rely on, null until the job fills it
            **previous,
            "name": name,
            RunKey.JOB: job,
            "args": args,
            RunKey.STATUS: RunState.RUNNING,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            RunKey.STARTED_AT: previous.get(RunKey.STARTED_AT) or _now(),
            "resumed_at": _now() if resume else None,
            RunKey.FINISHED_AT: None,
            "versions": versions(),
        }
        run.write_meta(meta)
        run._attach_log_file()
        return run

    def _attach_log_file(self) -> None:
        root = logging.getLogger("tinycloud")
        target = str((self.path / TRAIN_LOG).resolve())
        if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
            handler = logging.FileHandler(target, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            root.addHandler(handler)

    def close(self) -> None:
        """Detach this run's train.log handler, so a later run in the same process (a test, a
        demo calling several jobs' ``main``) does not write its lines into this run's log."""
        root = logging.getLogger("tinycloud")
        target = str((self.path / TRAIN_LOG).resolve())
        for h in [h for h in root.handlers if getattr(h, "baseFilename", None) == target]:
            root.removeHandler(h)
            h.close()

    # --- run.json ---------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / RUN_JSON).read_text())
        except FileNotFoundError:
            return {}

    def count_from(self, started: float) -> None:
        """Count this session's time from ``started`` (``time.monotonic()`` when the job's
        ``main`` began: reading data and loading a model cost as much as training)."""
        if self._clock is not None:
            self._clock.started = min(started, self._clock.started)

    def write_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write run.json as ``meta`` plus this session's time and cost; returns what it wrote."""
        clock = self._clock.fields() if self._clock is not None else {}
        meta = {**meta, **clock, RunKey.UPDATED_AT: _now()}
        atomic_write_bytes(self.path / RUN_JSON, (json.dumps(meta, indent=2) + "\n").encode())
        return meta

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into run.json (progress, best val loss, status...)."""
        return self.write_meta({**self.read_meta(), **fields})

    def finish(self, status: str = RunState.COMPLETED, **fields: Any) -> None:
        self.update(**{RunKey.STATUS: status, RunKey.FINISHED_AT: _now()}, **fields)

    # --- logs and metrics -------------------------------------------------------------------

    def log(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One JSON line per call, flushed so `fab status` sees it at once."""
        row = {**row, "time": round(time.time(), 3)}
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        return list(read_metrics(self.path / METRICS))

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint: they will be logged again."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write_bytes(self.path / METRICS, data)

    # --- outputs ----------------------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def trainer_checkpoints(self) -> Path:
        return self.path / TRAINER_CHECKPOINTS

    def plot_loss(self, title: str | None = None) -> Path | None:
        """Draw train and val loss from metrics.jsonl into loss.png (None if no rows yet)."""
        return plot_loss(self.path / METRICS, self.path / LOSS_PLOT, title or self.path.name)

    def write_manifest(self) -> Path:
        """Digest every deliverable, so a download can be verified file by file."""
        lines = [
            f"{sha256_file(p)}  {p.relative_to(self.path).as_posix()}"
            for p in sorted(iter_files(self.path))
            if p.name not in MANIFEST_EXCLUDES and not p.name.startswith(".")
        ]
        out = self.path / MANIFEST
        atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
        return out


@dataclass
class _Clock:
    """One session of a run: when it began, and the time and cost of the sessions before it."""

    started: float  # time.monotonic()
    elapsed_before: float  # seconds
    cost_before: float  # USD
    price: float  # USD an hour, this session

    def fields(self) -> dict[str, float]:
        now = time.monotonic() - self.started
        return {
            RunKey.ELAPSED_S: round(self.elapsed_before + now, 1),
            RunKey.COST_PER_HOUR_USD: self.price,
            RunKey.COST_USD: round(self.cost_before + now / 3600 * self.price, 4),
        }


# What --overwrite keeps: run.json is about to be rewritten, and console.log is the file the
# detached launcher already has open for this very run's output.
OVERWRITE_KEEPS = frozenset({RUN_JSON, CONSOLE_LOG})


def clear_run(path: Path) -> None:
    """Empty a run directory for --overwrite: the model, checkpoints (ckpt.pt and Trainer
    ``checkpoints/``), metrics, plots, reports, tokenizer, everything a job wrote, so the new
    run can never be mixed with files of the old one."""
    for entry in path.iterdir():
        if entry.name in OVERWRITE_KEEPS:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def iter_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


def read_metrics(path: Path) -> Iterable[dict[str, Any]]:
    """Rows of metrics.jsonl; a half-written last line (a killed job) is skipped, not fatal."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    rows = list(read_metrics(metrics_path))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless VM: no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time, not the one it was made with: a job's
    ``main`` may run again in the same process after stderr was replaced (tests capture it)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Console logging for a job's ``main``; RunDir.create adds the train.log file handler."""
    logger = logging.getLogger("tinycloud")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
