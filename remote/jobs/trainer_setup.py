"""What `finetune`'s SFT and DPO set up alike around a Hugging Face Trainer, read from one Config.

    device = device_kind(c)                          # "cpu" or "cuda"
    sched = schedule(c, n_train, world_size)         # steps, and how often to log/eval/save
    args = common_arguments(c, out, sched, device)   # TrainingArguments / DPOConfig keywords
    run = open_run(c, guard)                         # rank 0's run dir, once the input is good
    ...trainer.train()...
    final = final_eval(trainer); step = kept_step(c, trainer)

finetune.py builds the SFT Trainer and dpo.py trl's DPOTrainer on top of these; neither imports
the other.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from remote.jobs import dist as distlib
from remote.jobs import rundir, trackers
from remote.jobs.errors import JobError
from remote.jobs.finetune_flags import Config
from remote.jobs.guard import Guard
from remote.jobs.models import pick_device


def device_kind(c: Config) -> str:
    """ "cpu" or "cuda": the Trainer itself puts each torchrun rank on its own GPU."""
    return pick_device(c.device).partition(":")[0]


def _bf16_ok() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def precision(c: Config, device: str) -> str:
    """The arithmetic of this run: fp32, or mixed bf16/fp16 (matmuls in 16 bits, the weights
    and the optimizer in fp32). A CPU stays fp32 unless asked: its bf16 is fast only where the
    hardware has it (``cpu_bf16_native``), and fp32 is what the course and every CPU computes."""
    if c.precision == "auto":
        return ("bf16" if _bf16_ok() else "fp16") if device == "cuda" else "fp32"
    if c.precision == "fp16" and device == "cpu":
        raise JobError("--precision fp16 needs a GPU; on a CPU use bf16 (AVX512-BF16/AMX) or fp32")
    if c.precision == "bf16" and device == "cuda" and not _bf16_ok():
        raise JobError("this GPU has no bf16: use --precision fp16 (or auto)")
    return c.precision


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so that mixed bf16
    beats fp32 instead of emulating it slower."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: say nothing rather than guess
        return False
    flags = {f for line in info.splitlines() if line.startswith("flags") for f in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def schedule(c: Config, n_train: int, world: int) -> dict[str, int]:
    """Steps for the run and how often to log, evaluate and checkpoint.

    With ``--keep best`` every evaluation must leave a checkpoint to go back to, so checkpoints
    follow the evaluations unless ``--save-steps`` says otherwise (and then it must be a
    multiple of the evaluation interval)."""
    per_step = c.batch_size * c.grad_accum * world
    total = c.max_steps or max(1, math.ceil(c.epochs * n_train / per_step))
    every = max(1, total // 5)
    evals = c.eval_steps or every
    saves = c.save_steps or evals
    if c.keep == "best" and saves % evals:
        raise JobError(
            f"--keep best needs a checkpoint at every evaluation, but checkpoints come every "
            f"{saves} steps and evaluations every {evals}. Give --save-steps {evals}"
        )
    return {"total": total, "eval": evals, "save": saves, "log": min(c.logging_steps, total)}


def common_arguments(c: Config, out: Path, sched: dict, device: str) -> dict:
    """The TrainingArguments that SFT and DPO (dpo.dpo_config) share."""
    arithmetic = precision(c, device)
    keep_best = (
        {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}
        if c.keep == "best"
        else {}
    )
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": c.batch_size,
        "per_device_eval_batch_size": c.batch_size,
        "gradient_accumulation_steps": c.grad_accum,
        "learning_rate": c.lr,
        "weight_decay": c.weight_decay,  # on the Trainer's groups: not biases, not LayerNorms
        "max_steps": sched["total"],
        "warmup_steps": c.warmup_steps,
        "logging_steps": sched["log"],
        "eval_steps": sched["eval"],
        "save_strategy": "steps",
        "save_steps": sched["save"],
        "save_total_limit": 1,  # the Trainer keeps the best one too, with --keep best
        "report_to": [] if c.report_to == "none" else c.report_to.split(","),
        "seed": c.seed,
        "use_cpu": device == "cpu",
        "bf16": arithmetic == "bf16",
        "fp16": arithmetic == "fp16",
        "disable_tqdm": False,
        **keep_best,  # lower eval_loss is better: the Trainer's default for that metric
    }


def need_validation_for_keep_best(c: Config, n_val: int, why: str, fix: str) -> None:
    """--keep best with nothing to validate on cannot choose; say so before the run starts."""
    if c.keep == "best" and not n_val:
        raise JobError(
            f"--keep best picks the model by validation loss, but {why}. {fix}, or drop --keep best"
        )


def open_run(c: Config, guard: Guard) -> rundir.RunDir | None:
    """Create (or reopen with --resume) the run dir on rank 0; every rank learns its name, and
    every rank stops if rank 0 could not open it. Call it once the input has been checked."""
    d = guard.d
    c.name = distlib.broadcast_object(c.name or time.strftime("finetune-%Y%m%d-%H%M%S"), d)
    trackers.prepare(c.report_to, run_path(c))  # a tracker that is not installed stops it here
    opts = {"job": "finetune", "args": dataclasses.asdict(c), "resume": c.resume}
    run = distlib.on_main(
        d, rundir.RunDir.create, c.runs_dir, c.name, **opts, overwrite=c.overwrite
    )
    return guard.track(run)


def run_path(c: Config) -> Path:
    return rundir.runs_root(c.runs_dir) / c.name


def final_eval(trainer: Any) -> dict[str, float]:
    """The val loss at the last step: from the log if the Trainer just evaluated, else now."""
    step = trainer.state.global_step
    for row in reversed(trainer.state.log_history):
        if "eval_loss" in row and row.get("step") == step:
            return row
    return trainer.evaluate()


def kept_step(c: Config, trainer: Any) -> int:
    """The step whose weights the Trainer holds after ``train()``: with --keep best, the best
    evaluation's (load_best_model_at_end put them back), else the last step's."""
    state = trainer.state
    if c.keep == "best" and state.best_model_checkpoint and state.best_global_step:
        return int(state.best_global_step)
    return int(state.global_step)
