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
- nothing (``--dataset`` unset): the shipped ``remote/jobs/data/preference_pairs.jsonl``.

Reading and formatting rows is presets.py's job (``kind="preference"``); this module only drops
pairs that cannot teach anything.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from remote.jobs.dist import Dist
from remote.jobs.errors import JobError
from remote.jobs.presets import DatasetError
from remote.jobs.prompts import save_tokenizer_with_chat_format
from remote.jobs.rundir import COMPLETED, INTERRUPTED, RunDir

log = logging.getLogger("tinycloud.dpo")

# --- defaults (used when finetune's namespace leaves a value unset) ----------------------------
DEFAULT_BETA = 0.1  # DPO temperature: larger keeps the policy closer to the reference
DEFAULT_LR = 5e-6  # DPO wants a far smaller step than SFT
DEFAULT_MAX_LENGTH = 512  # tokens of prompt + answer; longer pairs lose their end
EVAL_FRACTION = 0.1  # held-out pairs for val_loss, when the data has at least 10 pairs
TRAINER_DIR = "trainer"  # Trainer checkpoints for --resume, removed once the run completes

SHIPPED_PAIRS = Path(__file__).resolve().parent / "data" / "preference_pairs.jsonl"

# --optimizer name -> (TrainingArguments.optim, optim_args)
OPTIMIZERS: dict[str, tuple[str, str | None]] = {
    "adamw": ("adamw_torch", None),
    "sgd": ("sgd", None),
    "sgd-momentum": ("sgd", "momentum=0.9"),
    "nesterov": ("sgd", "momentum=0.9,nesterov=True"),
}


class PreferenceDataError(DatasetError):
    """The pair data has no usable pair; the message says what was wrong and how to fix it."""


# --- data --------------------------------------------------------------------------------------


def to_pair(row: dict[str, str], eos: str) -> dict[str, str] | None:
    """One preference row (presets.py's PREFERENCE fields) as a trl example in our format.

    None for rows that teach DPO nothing: dialogues whose histories differ before the last
    turn, no final assistant reply, or the same answer twice.
    """
    from remote.jobs.presets import format_preference, parse_dialogue, render_turns

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

    ``dataset`` goes through presets.py (preset name, local file or hub id) read as
    preference data; unset means the shipped pairs.
    """
    from datasets import Dataset

    from remote.jobs.presets import PREFERENCE, hold_out, load_rows

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


# --- progress into the run directory -------------------------------------------------------------

# trl's log keys -> our metrics.jsonl keys (eval rows get the `val_` prefix)
_METRIC_KEYS = {
    "loss": "loss",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
    "learning_rate": "lr",
}


def metrics_row(logs: dict[str, float], step: int) -> dict[str, Any]:
    """Translate one Trainer ``on_log`` dict; ``{}`` when it carries no loss."""
    row: dict[str, Any] = {"step": step}
    for key, ours in _METRIC_KEYS.items():
        if key in logs:
            row[ours] = logs[key]
        if f"eval_{key}" in logs:
            row[f"val_{ours}"] = logs[f"eval_{key}"]
    return row if ("loss" in row or "val_loss" in row) else {}


def progress_callback(run: RunDir | None, stop: threading.Event):
    """A TrainerCallback that mirrors logs into run.json/metrics.jsonl and honours SIGTERM."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.step0 = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.monotonic(), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if stop.is_set():  # save where we are, then leave the loop
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = metrics_row(logs or {}, state.global_step)
            if run is None or not row:
                return
            run.append_metrics(row)
            if "loss" in row:
                done = max(state.global_step - self.step0, 1)
                rate = done / max(time.monotonic() - self.t0, 1e-9)
                left = max(state.max_steps - state.global_step, 0)
                run.update(
                    step=state.global_step,
                    max_steps=state.max_steps,
                    loss=row["loss"],
                    reward_margin=row.get("reward_margin"),
                    eta_s=round(left / rate, 1),
                )
                run.log(
                    "step %d/%d loss %.4f margin %.4f acc %.2f",
                    state.global_step,
                    state.max_steps,
                    row["loss"],
                    row.get("reward_margin", math.nan),
                    row.get("reward_accuracy", math.nan),
                )

    return _Progress()


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag (the callback checkpoints and stops) instead of killing."""

    def __init__(self, stop: threading.Event):
        self.stop, self.previous = stop, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, lambda *_: self.stop.set())
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --- training -----------------------------------------------------------------------------------


def _arg(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def dpo_config(args: argparse.Namespace, out: Path, has_eval: bool):
    """DPOConfig from finetune's flags. trl's own defaults (bf16 on, gradient checkpointing on)
    are overridden: fp32 on CPU, no checkpointing for models this size."""
    import torch
    from trl import DPOConfig

    device = _arg(args, "device", "auto")
    cuda = device != "cpu" and torch.cuda.is_available()
    optim, optim_args = OPTIMIZERS[_arg(args, "optimizer", "adamw")]
    max_steps = int(_arg(args, "max_steps", 0)) or -1
    log_every = max(1, min(10, max_steps // 10)) if max_steps > 0 else 10
    return DPOConfig(
        output_dir=str(out),
        beta=float(_arg(args, "beta", DEFAULT_BETA)),
        learning_rate=float(_arg(args, "lr", DEFAULT_LR)),
        per_device_train_batch_size=int(_arg(args, "batch_size", 4)),
        per_device_eval_batch_size=int(_arg(args, "batch_size", 4)),
        gradient_accumulation_steps=int(_arg(args, "grad_accum", 1)),
        max_steps=max_steps,
        num_train_epochs=1,
        max_length=int(_arg(args, "max_length", DEFAULT_MAX_LENGTH)),
        optim=optim,
        optim_args=optim_args,
        seed=int(_arg(args, "seed", 0)),
        logging_steps=log_every,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=log_every * 5,
        save_strategy="steps",
        save_steps=max(log_every * 10, 50),
        save_total_limit=1,
        report_to=_arg(args, "report_to", "none"),
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        gradient_checkpointing=False,
        dataset_num_proc=None,
        disable_tqdm=False,
    )


def load_policy(args: argparse.Namespace):
    """(policy, reference-or-None, tokenizer, peft_config-or-None) from ``--model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _arg(args, "model", "gpt2")
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise JobError(
            f"could not load model {source!r}: {first}. DPO starts from an SFT run: pass "
            f"--model runs/<sft-run>/model (or a hub id this machine can download)"
        ) from exc
    rank = int(_arg(args, "lora_rank", 0))
    if rank > 0:
        from peft import LoraConfig

        # With an adapter, trl gets the reference by switching the adapter off: no second copy.
        alpha = int(_arg(args, "lora_alpha", 0)) or 2 * rank
        peft = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM")
        return model, None, tok, peft
    return model, AutoModelForCausalLM.from_pretrained(source), tok, None


def save_model(trainer, tok, model_dir: Path) -> None:
    """A plain save_pretrained dir (LoRA merged in) with our chat format, for any server."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir)
    save_tokenizer_with_chat_format(tok, model_dir)


def train_dpo(args: argparse.Namespace, run: RunDir | None, dist: Dist) -> None:
    """Run DPO as ``args`` say; rank 0 writes ``run``. On SIGTERM/SIGINT: checkpoint, mark the
    run ``interrupted`` and raise KeyboardInterrupt (``--resume`` continues from there)."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOTrainer

    model, ref, tok, peft = load_policy(args)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    seed = int(_arg(args, "seed", 0))
    train, held_out = build_pairs(
        _arg(args, "dataset", None),
        getattr(args, "limit", None),
        tok.eos_token,
        seed,
        getattr(args, "columns", None),
    )
    out = (run.path if run is not None else Path(".")) / TRAINER_DIR
    config = dpo_config(args, out, held_out is not None)
    stop = threading.Event()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        peft_config=peft,
        callbacks=[progress_callback(run if dist.is_main else None, stop)],
    )
    resume_from = get_last_checkpoint(str(out)) if getattr(args, "resume", False) else None
    if run is not None:
        run.log(
            "dpo: %d train pairs, beta %s, resume from %s", len(train), config.beta, resume_from
        )
    with _StopOnSignal(stop):
        result = trainer.train(resume_from_checkpoint=resume_from)
    if stop.is_set():
        if run is not None:
            run.finish(INTERRUPTED, step=trainer.state.global_step)
        raise KeyboardInterrupt("dpo interrupted; checkpoint saved, --resume continues it")
    if run is None:
        return
    save_model(trainer, tok, run.model_dir)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints only serve --resume of an unfinished run
    run.plot_loss(f"{run.path.name} (DPO, beta {config.beta})")
    final = next((r for r in reversed(run.metrics()) if "reward_margin" in r), {})
    run.finish(
        COMPLETED,
        step=trainer.state.global_step,
        train_loss=result.training_loss,
        reward_margin=final.get("reward_margin"),
        reward_accuracy=final.get("reward_accuracy"),
    )
    run.write_manifest()
