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
pairs that cannot teach anything.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from facts import RunState
from remote.jobs.dataset import DatasetError
from remote.jobs.dist import Dist
from remote.jobs.errors import JobError
from remote.jobs.rundir import RunDir

log = logging.getLogger("tinycloud.dpo")

# The flags and their defaults are finetune's (--beta, and --lr 5e-6 for --method dpo).
EVAL_FRACTION = 0.1  # held-out pairs for val_loss, when the data has at least 10 pairs

SHIPPED_PAIRS = Path(__file__).resolve().parent / "data" / "preference_pairs.jsonl"

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
    from remote.jobs.dataset import format_preference, parse_dialogue, render_turns

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


def build_pairs(
    dataset: str | None, limit: int | None, eos: str, seed: int, columns: str | None = None
):
    """(train, held-out-or-None) ``datasets.Dataset`` of prompt/chosen/rejected strings.

    ``dataset`` goes through dataset.py (preset name, local file or hub id) read as
    preference data; unset means the shipped pairs.
    """
    from datasets import Dataset

    from remote.jobs.dataset import PREFERENCE, hold_out, load_rows

    source = dataset or str(SHIPPED_PAIRS)
    try:
        rows = load_rows(source, kind=PREFERENCE, limit=limit, columns=columns).rows
    except PreferenceDataError:
        raise
    except DatasetError as exc:
        raise PreferenceDataError(
            f"{str(exc).rstrip('.')}. --method dpo needs chosen/rejected pairs: use --dataset "
            f"hh-rlhf or a file like {SHIPPED_PAIRS.relative_to(SHIPPED_PAIRS.parents[3])}"
        ) from exc
    pairs = [p for p in (to_pair(r, eos) for r in rows) if p is not None]
    if not pairs:
        raise PreferenceDataError(
            f"none of the {len(rows)} rows of {source} is a usable pair: chosen and rejected "
            f"must answer the same prompt and differ. Check the data, or use --dataset hh-rlhf"
        )
    log.info("dpo: %d usable pairs of %d rows", len(pairs), len(rows))
    if len(pairs) < 10:  # too few to spare any for validation
        return Dataset.from_list(pairs), None
    train, held = hold_out(pairs, max(1, int(len(pairs) * EVAL_FRACTION)), seed)
    return Dataset.from_list(train), Dataset.from_list(held)


# --- training -----------------------------------------------------------------------------------


def dpo_config(args: argparse.Namespace, out: Path, sched: dict[str, int], has_eval: bool):
    """DPOConfig from finetune's flags and schedule. trl's own defaults (bf16 on CPU too,
    gradient checkpointing on) are overridden: fp32 on CPU, no checkpointing for models
    this size."""
    from trl import DPOConfig

    from remote.jobs.finetune import common_arguments, device_kind

    return DPOConfig(
        **common_arguments(args, out, sched, device_kind(args)),
        beta=args.beta,
        max_length=args.max_length,
        eval_strategy="steps" if has_eval else "no",
        gradient_checkpointing=None,  # the old name, which trl sets: None leaves the new one
        activation_checkpointing=False,
        dataset_num_proc=None,
    )


def load_policy(args: argparse.Namespace):
    """(policy, reference-or-None, tokenizer, peft_config-or-None) from ``--model``.

    With LoRA, trl gets the reference by switching the adapter off: no second copy."""
    from remote.jobs.models import load_model, load_tokenizer, lora_config

    try:
        tok, model = load_tokenizer(args.model), load_model(args.model)
    except JobError as exc:
        raise JobError(f"{str(exc).rstrip('.')}. DPO starts from an SFT run's model") from exc
    if args.lora_rank > 0:
        return model, None, tok, lora_config(args.lora_rank, args.lora_alpha)
    return model, load_model(args.model), tok, None


def build_trainer(args: argparse.Namespace, run: RunDir | None, dist: Dist, callbacks: list):
    """The DPOTrainer for ``args``, its optimizer set by ``--optimizer`` like finetune's."""
    from trl import DPOTrainer

    from remote.jobs.finetune import schedule
    from remote.jobs.optimizers import optimizer_spec
    from remote.jobs.rundir import TRAINER_CHECKPOINTS, runs_root

    model, ref, tok, peft = load_policy(args)
    train, held_out = build_pairs(args.dataset, args.limit, tok.eos_token, args.seed, args.columns)
    out = run.path if run is not None else runs_root(args.runs_dir) / args.name
    sched = schedule(args, len(train), dist.world_size)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=dpo_config(args, out / TRAINER_CHECKPOINTS, sched, held_out is not None),
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        peft_config=peft,
        callbacks=callbacks,
    )
    # DPOTrainer's __init__ does not take it, but its create_optimizer (the Trainer's) reads it.
    trainer.optimizer_cls_and_kwargs = optimizer_spec(args.optimizer, args.lr)
    return trainer, tok, len(train)


def train_dpo(args: argparse.Namespace, run: RunDir | None, dist: Dist) -> None:
    """Run DPO as finetune's ``args`` say; rank 0 writes ``run``. On SIGTERM/SIGINT: save a
    checkpoint and raise ``Interrupted`` (status ``interrupted``; ``--resume`` continues)."""
    from remote.jobs.models import save_model
    from remote.jobs.trainer_callbacks import MetricsCallback, StopOnSignal, resume_point

    stop = StopOnSignal(dist)
    metrics = MetricsCallback(run, world=dist.world_size, keys=METRIC_KEYS)
    trainer, tok, n_train = build_trainer(args, run, dist, [metrics, stop])
    out = Path(trainer.args.output_dir)
    resume_from = resume_point(out, run) if args.resume else None
    if run is not None:
        run.log("dpo: %d train pairs, beta %s, from %s", n_train, args.beta, args.model)
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume_from)
    stop.raise_if_stopped(step=trainer.state.global_step)
    if run is None:
        return
    save_model(trainer.model, tok, run.model_dir)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints only serve --resume of an unfinished run
    run.plot_loss(f"{run.path.name} (DPO, beta {args.beta})")
    final = next((r for r in reversed(run.metrics()) if "reward_margin" in r), {})
    run.finish(
        RunState.COMPLETED,
        step=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        train_loss=result.training_loss,
        reward_margin=final.get("reward_margin"),
        reward_accuracy=final.get("reward_accuracy"),
    )
    run.write_manifest()
    run.log("model saved to %s", run.model_dir)
