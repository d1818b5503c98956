"""Direct preference optimisation (DPO) on chosen/rejected pairs, starting from an SFT run.

Called by ``finetune`` for ``--method dpo``; it is not a CLI of its own:

    python -m remote.jobs.finetune --method dpo --model runs/sft-1/model \\
        --dataset hh-rlhf --limit 2000 --beta 0.1 --max-steps 200
    python -m remote.jobs.finetune --method dpo --model runs/sft-1/model \\
        --dataset remote/jobs/data/preference_pairs.jsonl --max-steps 40

DPO raises the policy's log-probability of the preferred answer relative to the rejected one,
measured against a frozen copy of the starting model (the reference), with ``beta`` setting how
far the policy may drift from it. trl's ``DPOTrainer`` does the work; this module turns the data
into our prompt format, wires progress into the run directory and saves a plain model dir.

Data accepted (``--dataset``):

- ``hh-rlhf``: Anthropic/hh-rlhf helpful-base. Each row is two whole dialogues; the shared
  turns become the prompt (in our chat format) and the differing last assistant turns become
  ``chosen``/``rejected``.
- a local JSONL/JSON/CSV/Parquet file or a hub id with ``prompt`` (the instruction),
  ``chosen`` and ``rejected`` columns, or hh-style dialogues in ``chosen``/``rejected`` and no
  ``prompt`` (``--columns prompt=COL,chosen=COL,rejected=COL`` maps other names).
- nothing (``--dataset`` unset): the shipped ``remote/jobs/data/preference_pairs.jsonl``
  (finetune fills it in).

Reading and formatting rows is dataset.py's job (``kind="preference"``); this module only drops
pairs that cannot teach anything. The flags are finetune's (finetune_flags.py: ``--beta``, and
``--lr`` 5e-6 for DPO; the SFT-only ones are refused) and the Trainer set-up is shared with SFT
(trainer_setup.py). The pairs are read and checked before the tokenizer, the run directory or
the model: a bad file costs no download.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from facts import RunKey, RunState
from remote.jobs import dist as distlib
from remote.jobs import rundir
from remote.jobs.dataset import (
    PREFERENCE,
    DatasetError,
    format_preference,
    hold_out,
    load_rows,
    parse_dialogue,
    render_turns,
)
from remote.jobs.errors import Interrupted, JobError
from remote.jobs.finetune_flags import SHIPPED_PAIRS, Config
from remote.jobs.guard import Guard
from remote.jobs.models import check_source, load_model, load_tokenizer, lora_config, save_model
from remote.jobs.optimizers import optimizer_spec
from remote.jobs.signals import StopSignal
from remote.jobs.trainer_setup import (
    common_arguments,
    device_kind,
    final_eval,
    kept_step,
    need_validation_for_keep_best,
    open_run,
    precision,
    run_path,
    schedule,
)

log = logging.getLogger("tinycloud.dpo")

EVAL_FRACTION = 0.1  # held-out pairs for val_loss...
EVAL_MIN_PAIRS = 10  # ...when the data has at least this many

# trl's log keys -> our metrics.jsonl keys (eval rows get the `val_` prefix)
METRIC_KEYS = {
    "loss": "loss",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
    "learning_rate": "lr",
}


class PreferenceDataError(DatasetError):
    """The pair data has no usable pair; the message says what was wrong and how to fix it."""


# --- data --------------------------------------------------------------------------------------


def to_pair(row: dict[str, str], eos: str) -> dict[str, str] | None:
    """One preference row (dataset.py's PREFERENCE fields) as a trl example in our format.

    None for rows that teach DPO nothing: dialogues whose histories differ before the last
    turn, no final assistant reply, or the same answer twice.
    """
    try:
        prompt, chosen, rejected = format_preference(row, eos)
        if not row.get("prompt"):  # transcripts: the earlier turns must be the same
            other, _ = render_turns(parse_dialogue(row["rejected"]), eos)
            if other != prompt:
                return None
    except ValueError:
        return None
    if chosen == rejected or not chosen.removesuffix(eos).strip():
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_pairs(dataset: str, limit: int | None, columns: str | None = None) -> list[dict]:
    """The rows of ``dataset`` (preset, local file or hub id, read as preference data) that make
    usable pairs. Needs no tokenizer: whether a row is a pair does not depend on the EOS text."""
    try:
        rows = load_rows(dataset, kind=PREFERENCE, limit=limit, columns=columns).rows
    except DatasetError as exc:
        raise PreferenceDataError(
            f"{str(exc).rstrip('.')}. --method dpo needs chosen/rejected pairs: use --dataset "
            f"hh-rlhf or a file like {SHIPPED_PAIRS.relative_to(SHIPPED_PAIRS.parents[3])}"
        ) from exc
    usable = [r for r in rows if to_pair(r, "") is not None]
    if not usable:
        raise PreferenceDataError(
            f"none of the {len(rows)} rows of {dataset} is a usable pair: chosen and rejected "
            f"must answer the same prompt and differ. Check the data, or use --dataset hh-rlhf"
        )
    log.info("dpo: %d usable pairs of %d rows", len(usable), len(rows))
    return usable


def split_pairs(rows: list[dict], eos: str, seed: int) -> tuple[Any, Any]:
    """(train, held-out-or-None) ``datasets.Dataset`` of prompt/chosen/rejected strings; pairs
    are held out only from EVAL_MIN_PAIRS on."""
    from datasets import Dataset

    pairs = [p for p in (to_pair(r, eos) for r in rows) if p is not None]
    if len(pairs) < EVAL_MIN_PAIRS:  # too few to spare any for validation
        return Dataset.from_list(pairs), None
    train, held = hold_out(pairs, max(1, int(len(pairs) * EVAL_FRACTION)), seed)
    return Dataset.from_list(train), Dataset.from_list(held)


def build_pairs(dataset: str, limit: int | None, eos: str, seed: int, columns: str | None = None):
    """``read_pairs`` then ``split_pairs``: the data of one DPO run."""
    return split_pairs(read_pairs(dataset, limit, columns), eos, seed)


# --- training -----------------------------------------------------------------------------------


def dpo_config(c: Config, out: Path, sched: dict[str, int], has_eval: bool):
    """DPOConfig from finetune's flags and schedule. trl's own defaults (bf16 on CPU too,
    gradient checkpointing on) are overridden: fp32 on CPU, no checkpointing for models
    this size."""
    from trl import DPOConfig

    return DPOConfig(
        **common_arguments(c, out, sched, device_kind(c)),
        beta=c.beta,
        max_length=c.max_length,
        eval_strategy="steps" if has_eval else "no",
        gradient_checkpointing=None,  # the old name, which trl sets: None leaves the new one
        activation_checkpointing=False,
        dataset_num_proc=None,
    )


def _with_hint(exc: JobError) -> JobError:
    return JobError(f"{str(exc).rstrip('.')}. DPO starts from an SFT run's model")


def load_dpo_tokenizer(c: Config) -> Any:
    try:
        return load_tokenizer(c.model)
    except JobError as exc:
        raise _with_hint(exc) from exc


def load_policy(c: Config) -> tuple[Any, Any, Any]:
    """(policy, reference-or-None, peft_config-or-None) from ``--model``.

    With LoRA, trl gets the reference by switching the adapter off: no second copy."""
    try:
        model = load_model(c.model)
    except JobError as exc:
        raise _with_hint(exc) from exc
    if c.lora_rank > 0:
        return model, None, lora_config(c.lora_rank, c.lora_alpha)
    return model, load_model(c.model), None


def build_trainer(
    c: Config, tok: Any, train: Any, held_out: Any, out: Path, sched: dict, callbacks: list
):
    """The DPOTrainer for ``c``, its optimizer set by ``--optimizer`` like finetune's."""
    from trl import DPOTrainer

    model, ref, peft = load_policy(c)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=dpo_config(c, out, sched, held_out is not None),
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        peft_config=peft,
        callbacks=callbacks,
    )
    # DPOTrainer's __init__ does not take it, but its create_optimizer (the Trainer's) reads it.
    trainer.optimizer_cls_and_kwargs = optimizer_spec(c.optimizer, c.lr)
    return trainer


def train_dpo(c: Config, guard: Guard, stop: StopSignal) -> int:
    """Run DPO as finetune's flags say; rank 0 writes the run. On SIGTERM/SIGINT: save a
    checkpoint and raise ``Interrupted`` (status ``interrupted``; ``--resume`` continues)."""
    from remote.jobs.trainer_callbacks import MetricsCallback, StopOnSignal, resume_point

    d = guard.d
    check_source(c.model)
    rows = read_pairs(c.dataset, c.limit, c.columns)
    device = device_kind(c)
    precision(c, device)  # a precision this machine lacks fails now
    tok = load_dpo_tokenizer(c)
    train, held_out = split_pairs(rows, tok.eos_token, c.seed)
    why = f"DPO holds out pairs only from {EVAL_MIN_PAIRS} on, and this data has {len(rows)}"
    need_validation_for_keep_best(c, len(held_out or []), why, "Give more pairs")
    sched = schedule(c, len(train), d.world_size)
    run = open_run(c, guard)
    if run is not None:
        run.log("dpo: %d train pairs, beta %s, from %s", len(train), c.beta, c.model)
        run.update(
            examples={"train": len(train), "val": len(held_out or [])},
            **{RunKey.TRAIN_EXAMPLES: len(train), RunKey.TRAIN_TOKENS: None},
        )
    out = run_path(c) / rundir.TRAINER_CHECKPOINTS
    stopper = StopOnSignal(d, stop)
    metrics = MetricsCallback(run, world=d.world_size, keys=METRIC_KEYS)
    trainer = build_trainer(c, tok, train, held_out, out, sched, [metrics, stopper])
    resume_from = resume_point(out, run) if c.resume else None
    if stop.signum:  # asked to stop while setting up: nothing new to save yet
        raise Interrupted(stop.signum)
    result = trainer.train(resume_from_checkpoint=resume_from)
    stopper.raise_if_stopped(step=trainer.state.global_step)
    final = final_eval(trainer) if held_out is not None else {}
    if run is not None:
        finish(run, c, trainer, tok, result, final)
    distlib.barrier(d)
    return 0


def finish(run: rundir.RunDir, c: Config, trainer: Any, tok: Any, result: Any, final: dict) -> None:
    """Save the policy where servers look for it, then close the run (manifest last)."""
    kept = kept_step(c, trainer)
    save_model(trainer.model, tok, run.model_dir)
    shutil.rmtree(run.trainer_checkpoints, ignore_errors=True)  # for --resume of this run only
    run.plot_loss(f"{run.path.name} (DPO, beta {c.beta})")
    last = next((r for r in reversed(run.metrics()) if "reward_margin" in r), {})
    run.finish(
        RunState.COMPLETED,
        **{
            RunKey.STEP: trainer.state.global_step,
            RunKey.MAX_STEPS: trainer.state.max_steps,
            RunKey.FINAL_VAL_LOSS: final.get("eval_loss"),
            RunKey.KEPT_STEP: kept,
        },
        train_loss=result.training_loss,
        reward_margin=last.get("reward_margin"),
        reward_accuracy=last.get("reward_accuracy"),
    )
    run.write_manifest()
    if kept != trainer.state.global_step:
        run.log("--keep best: model/ holds step %d's weights", kept)
    run.log("model saved to %s", run.model_dir)
