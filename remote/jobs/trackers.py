"""``--report-to``: refuse a tracker that is not installed; keep each tracker's files in the run.

    trackers.prepare("tensorboard,wandb", run_dir)   # before the run dir is made; JobError if not

The trackers are optional dependency groups (pyproject.toml): a VM has one only after
`fab setup --groups NAME`, so a run asking for another stops here, before its run starts, with
the command that adds it. Where a tracker would otherwise write outside the run or fail without
a server, it gets a default inside the run dir; anything the user set in the environment wins:

- tensorboard: event files in ``<run>/tensorboard`` (the Trainer's own default is inside the
  checkpoints folder, which a finished run deletes);
- mlflow: a file store in ``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI`` names a server
  (mlflow-skinny has no SQLite store, MLflow 3's own default, and MLflow 3 accepts its file
  store, in maintenance mode, only with ``MLFLOW_ALLOW_FILE_STORE=true``);
- wandb: files in ``<run>/wandb``, offline unless ``WANDB_API_KEY`` is set (then ``wandb sync``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from remote.jobs.errors import JobError

TRACKERS = ("tensorboard", "mlflow", "wandb")  # the --report-to names with a dependency group


def requested(report_to: str) -> list[str]:
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    return [] if names in ([], ["none"]) else names


def prepare(report_to: str, run_dir: Path) -> None:
    """Check every tracker in ``report_to`` is importable; point its files into ``run_dir``."""
    names = requested(report_to)
    unknown = [n for n in names if n not in (*TRACKERS, "all")]
    if unknown:
        raise JobError(
            f"--report-to {','.join(unknown)}: not a tracker tinycloud sets up. Use "
            f"{', '.join(TRACKERS)} (comma-separated) or none"
        )
    missing = [n for n in names if n in TRACKERS and importlib.util.find_spec(n) is None]
    if missing:
        which = ",".join(missing)
        raise JobError(
            f"--report-to {which}: {' and '.join(missing)} is not installed in this environment. "
            f"Add it with `fab setup --groups {which}` (on this machine: "
            f"`uv sync --group {' --group '.join(missing)}`), then start the run again"
        )
    chosen = TRACKERS if names == ["all"] else names
    run_dir = run_dir.resolve()
    if "tensorboard" in chosen:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    if "mlflow" in chosen and "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if "wandb" in chosen:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    if "wandb" in chosen and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
