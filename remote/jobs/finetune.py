"""Fine-tune a causal language model (GPT-2 by default) on instructions, dialogues or plain text.

    python -m remote.jobs.finetune --dataset alpaca-1k                  # the course's Part 2
    python -m remote.jobs.finetune --dataset alpaca-1k --limit 200 --name alpaca-200   # Task 2
    python -m remote.jobs.finetune --dataset netflix --model EleutherAI/gpt-neo-125m  # Part 3
    python -m remote.jobs.finetune --model runs/my-pretrain/model --dataset my.jsonl \\
        --columns instruction=question,output=answer --lora-rank 16
    python -m remote.jobs.finetune --method dpo --dataset hh-rlhf --model runs/sft/model
    torchrun --nproc_per_node=2 -m remote.jobs.finetune ...             # DDP, unchanged

It writes ``runs/<name>/`` (see rundir.py): run.json with progress and peak memory,
metrics.jsonl, loss.png, and ``model/``, a plain ``save_pretrained`` directory (LoRA is merged
in) whose tokenizer carries the chat template of prompts.py, so TGI and the native server both
serve it. Instruction data is trained in the Alpaca format with EOS closing every answer and
loss on the answer alone; see batching.py for why it is several times faster than the course's
recipe. Before loading any weights it estimates the memory the run needs (memory.py) and stops
with the numbers if the machine does not have it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from remote.jobs import dist as distlib
from remote.jobs import memory, rundir
from remote.jobs.batching import FlattenBatch, PadToLongest, response_loss, tokenize_examples
from remote.jobs.presets import DatasetError, describe_presets, load_splits
from remote.jobs.prompts import save_tokenizer_with_chat_format

# --- defaults (one per line; every one is a flag) --------------------------------------------
MODEL = "gpt2"  # hub id or a local save_pretrained dir (e.g. runs/<pretrain>/model)
DATASET = "alpaca-1k"  # preset, local .jsonl/.csv/.parquet, or hub id
METHOD = "sft"  # sft | dpo (dpo: chosen/rejected pairs, start from an SFT run)
MAX_STEPS = 100  # optimizer steps, the course's 100; 0 = run --epochs over the data
EPOCHS = 1.0  # passes over the data when --max-steps 0
BATCH_SIZE = 4  # examples per micro-batch, per process
GRAD_ACCUM = 4  # micro-batches per optimizer step: 16 examples a step, as in the course
LR = 5e-5  # peak learning rate, full fine-tuning (linear decay to 0)
LORA_LR = 2e-4  # peak learning rate with --lora-rank (adapters start at zero; they need more)
WARMUP_STEPS = 0  # linear warm-up, in optimizer steps
WEIGHT_DECAY = 0.0  # AdamW decoupled weight decay
MAX_LENGTH = 512  # tokens per example (cut beyond); never more than the model's context
OPTIMIZER = "adamw"  # adamw | sgd | sgd-momentum | nesterov
MOMENTUM = 0.9  # for sgd-momentum and nesterov
LORA_RANK = 0  # 0 = full fine-tuning; R > 0 = LoRA adapters of rank R, merged at the end
LORA_ALPHA = 0  # LoRA scale numerator; 0 = 2 x rank
BETA = 0.1  # DPO: strength of the pull toward the reference model
LOGGING_STEPS = 5  # optimizer steps between train-loss rows
EVAL_STEPS = 0  # optimizer steps between val-loss rows; 0 = five evaluations per run
SAVE_STEPS = 0  # optimizer steps between checkpoints; 0 = same as evaluations
SEED = 1337  # data order, validation hold-out, LoRA init
REPORT_TO = "none"  # Trainer trackers: none | tensorboard | mlflow | wandb | all
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "nesterov")
CHECKPOINTS = "checkpoints"  # Trainer checkpoints inside the run dir (removed on completion)

EXIT_ERROR, EXIT_INTERRUPTED = 1, 128 + signal.SIGTERM


class JobError(RuntimeError):
    """A user-facing error: printed as one `error: ...` line, exit 1, no traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m remote.jobs.finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="dataset presets:\n" + describe_presets(),
    )
    a = p.add_argument
    a("--model", default=MODEL, help=f"base model: hub id or local dir (default {MODEL})")
    a("--dataset", default=DATASET, help=f"preset, local file or hub id (default {DATASET})")
    a("--columns", help="map dataset columns to fields: instruction=COL,input=COL,output=COL")
    a("--text-column", help="train on the plain text in this column (loss on all of it)")
    a("--limit", type=int, help="use only the first N rows (the course's Task 2)")
    a("--val-size", type=int, help="validation rows when the dataset has no split (5%%, ≤100)")
    a("--method", choices=("sft", "dpo"), default=METHOD, help="sft (default) or dpo")
    a("--beta", type=float, default=BETA, help=f"DPO beta (default {BETA})")
    a("--max-steps", type=int, default=MAX_STEPS, help=f"optimizer steps (default {MAX_STEPS})")
    a("--epochs", type=float, default=EPOCHS, help="passes over the data if --max-steps 0")
    a("--batch-size", type=int, default=BATCH_SIZE, help="examples per micro-batch")
    a("--grad-accum", type=int, default=GRAD_ACCUM, help="micro-batches per optimizer step")
    a("--lr", type=float, help=f"peak learning rate (default {LR}; {LORA_LR} with LoRA)")
    a("--warmup-steps", type=int, default=WARMUP_STEPS)
    a("--weight-decay", type=float, default=WEIGHT_DECAY)
    a("--max-length", type=int, default=MAX_LENGTH, help="tokens per example")
    a("--optimizer", choices=OPTIMIZERS, default=OPTIMIZER)
    a("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank; 0 = full fine-tuning")
    a("--lora-alpha", type=int, default=LORA_ALPHA, help="LoRA alpha (default 2 x rank)")
    a("--packing", action="store_true", help="pack micro-batches pad-free (faster on GPU)")
    a("--logging-steps", type=int, default=LOGGING_STEPS)
    a("--eval-steps", type=int, default=EVAL_STEPS)
    a("--save-steps", type=int, default=SAVE_STEPS)
    a("--report-to", default=REPORT_TO, help="Trainer trackers (tensorboard, mlflow, wandb)")
    a("--memory-limit-gb", type=float, help="plan for a machine with this much memory")
    a("--no-memory-check", dest="memory_check", action="store_false")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--seed", type=int, default=SEED)
    a("--name", help="run name (default finetune-YYYYmmdd-HHMMSS)")
    a("--runs-dir", help="runs root (default $TINYCLOUD_RUNS or ./runs)")
    a("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    a("--overwrite", action="store_true", help="start the run --name again from scratch")
    a("--verbose", action="store_true")
    args = p.parse_args(argv)
    for flag in ("batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lora_rank < 0 or args.max_steps < 0:
        p.error("--lora-rank and --max-steps cannot be negative")
    if args.lr is None:
        args.lr = LORA_LR if args.lora_rank else LR
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    return args


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = rundir.setup_logging(args.verbose)
    d = distlib.setup()
    run: rundir.RunDir | None = None
    try:
        if args.method == "dpo":
            run = open_run(args, d)
            from remote.jobs.dpo import train_dpo

            train_dpo(args, run, d)
            return 0
        return train_sft(args, d)
    except (JobError, DatasetError, memory.MemoryEstimateError, FileExistsError) as exc:
        msg = str(exc).rstrip(".")
        if d.is_main:
            print(f"error: {msg}.", file=sys.stderr)
            log.debug("error", exc_info=True)
        run = run or _current_run
        if run is not None and not isinstance(exc, FileExistsError):
            run.finish(rundir.FAILED, error=msg)
        return EXIT_ERROR
    except BaseException as exc:  # a bug: keep the traceback, but never leave "running" behind
        run = run or _current_run
        if run is not None:
            run.finish(rundir.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        distlib.cleanup(d)


_current_run: rundir.RunDir | None = None  # set once created, so main() can mark it failed


def open_run(args: argparse.Namespace, d: distlib.Dist) -> rundir.RunDir | None:
    """Create (or reopen with --resume) the run dir on rank 0; every rank learns its name."""
    global _current_run
    name = _agree(d, args.name or time.strftime("finetune-%Y%m%d-%H%M%S"))
    args.name = name
    run, err = None, None
    if d.is_main:
        try:
            run = rundir.RunDir.create(
                args.runs_dir,
                name,
                job="finetune",
                args=vars(args),
                resume=args.resume,
                overwrite=args.overwrite,
            )
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            err = str(exc)
    err = _agree(d, err)
    if err:
        raise JobError(err)
    _current_run = run
    return run


def run_path(args: argparse.Namespace) -> Path:
    return rundir.runs_root(args.runs_dir) / args.name


def _agree(d: distlib.Dist, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (names with timestamps, errors found on rank 0)."""
    if not d.enabled:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# --- the SFT job -------------------------------------------------------------------------------


def device_of(args: argparse.Namespace) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise JobError("--device cuda: no CUDA GPU is visible. Use --device cpu or auto")
    return args.device


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise JobError(_load_hint(name, exc)) from exc
    if tok.eos_token is None:
        raise JobError(f"tokenizer of {name!r} has no EOS token; fine-tuning needs one to stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 has none; padding is masked out anyway
    return tok


def _load_hint(name: str, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if Path(name).exists():
        return f"could not load model {name!r}: {first}. It must be a save_pretrained directory"
    return (
        f"could not load model {name!r}: {first}. Give a local model directory "
        "(e.g. runs/<run>/model) or a hub id this machine can download"
    )


def prepare_data(args: argparse.Namespace, tok: Any, context: int) -> dict[str, Any]:
    """Rows -> formatted text -> token ids and labels, for train and validation."""
    train_rows, val_rows = load_splits(
        args.dataset,
        limit=args.limit,
        columns=args.columns,
        text_column=args.text_column,
        val_size=args.val_size,
        seed=args.seed,
    )
    max_len = min(args.max_length, context)
    train, dropped = tokenize_examples(tok, train_rows.examples(tok.eos_token), max_len)
    val, _ = tokenize_examples(tok, val_rows.examples(tok.eos_token), max_len)
    if not train:
        raise JobError(
            f"no usable training examples in {args.dataset!r} ({dropped} dropped: every prompt "
            f"is {max_len} tokens or longer, or every answer is empty). Raise --max-length"
        )
    return {
        "train": train,
        "val": val,
        "kind": train_rows.kind,
        "columns": train_rows.columns,
        "val_split": val_rows.split,
        "dropped": dropped,
        "max_len": max_len,
    }


def plan_memory(args: argparse.Namespace, config: Any, data: dict[str, Any], device: str) -> Any:
    """Estimate this run's memory from the model config and the longest examples; stop now
    (MemoryEstimateError) if the machine cannot hold it."""
    shape = memory.shape_of(config)
    longest = sorted(data["train"], key=lambda f: len(f["input_ids"]))[-args.batch_size :]
    seq_len = len(longest[-1]["input_ids"])
    loss_tokens = sum(sum(x != -100 for x in f["labels"]) for f in longest)
    half = device == "cuda" and _bf16_ok()
    est = memory.estimate(
        shape,
        batch_size=args.batch_size,
        seq_len=seq_len,
        loss_tokens=loss_tokens,
        optimizer=args.optimizer,
        lora_rank=args.lora_rank,
        activation_bytes=2 if half else 4,
    )
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
    budget, source = memory.available(device, limit_gib=args.memory_limit_gb, procs=procs)
    if args.memory_check:
        memory.check(shape, est, budget, source, grad_accum=args.grad_accum)
    return est, budget


def _bf16_ok() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_model(args: argparse.Namespace, tok: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise JobError(_load_hint(args.model, exc)) from exc
    model.config.use_cache = False  # no KV cache while training
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    if args.lora_rank:
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    return model


def add_lora(model: Any, rank: int, alpha: int) -> Any:
    """LoRA adapters on peft's default modules for the architecture (GPT-2: the fused q/k/v),
    or on every linear layer for architectures peft has no default for."""
    from peft import LoraConfig, get_peft_model

    def config(targets: Any) -> Any:
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )

    try:
        return get_peft_model(model, config(None))
    except ValueError:
        return get_peft_model(model, config("all-linear"))


def optimizer_spec(name: str, weight_decay: float) -> tuple[type, dict[str, Any]]:
    """(optimizer class, its keyword arguments) for Trainer's ``optimizer_cls_and_kwargs``."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW, {"weight_decay": weight_decay, "foreach": True}
    momentum = {"sgd": 0.0, "sgd-momentum": MOMENTUM, "nesterov": MOMENTUM}[name]
    return torch.optim.SGD, {
        "momentum": momentum,
        "nesterov": name == "nesterov",
        "weight_decay": weight_decay,
    }


def schedule(args: argparse.Namespace, n_train: int, world: int) -> dict[str, int]:
    """Steps for the run and how often to log, evaluate and checkpoint."""
    per_step = args.batch_size * args.grad_accum * world
    total = args.max_steps or max(1, math.ceil(args.epochs * n_train / per_step))
    every = max(1, total // 5)
    return {
        "total": total,
        "eval": args.eval_steps or every,
        "save": args.save_steps or args.eval_steps or every,
        "log": min(args.logging_steps, total),
    }


def training_arguments(args: argparse.Namespace, out: Path, sched: dict, device: str) -> Any:
    from transformers import TrainingArguments

    half = device == "cuda"
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        max_steps=sched["total"],
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=sched["log"],
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=sched["eval"],
        save_strategy="steps",
        save_steps=sched["save"],
        save_total_limit=1,
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy="random" if args.packing else "group_by_length",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        use_cpu=device == "cpu",
        bf16=half and _bf16_ok(),
        fp16=half and not _bf16_ok(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def make_trainer(
    model: Any,
    tok: Any,
    train: list[dict],
    val: list[dict],
    targs: Any,
    *,
    optimizer: str = OPTIMIZER,
    weight_decay: float = WEIGHT_DECAY,
    packing: bool = False,
    callbacks: list | None = None,
) -> Any:
    """A Trainer whose loss is ``batching.response_loss``: lm_head only where labels are, and
    which counts the real (non-padding) tokens it trains on."""
    from transformers import Trainer

    class _ResponseTrainer(Trainer):
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                real = mask.sum() if mask is not None else inputs["input_ids"].numel()
                self.tokens_seen += int(real)
            loss = response_loss(model, inputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages; the count is global
            return (loss, {"loss": loss}) if return_outputs else loss

    collator = FlattenBatch() if packing else PadToLongest(tok.pad_token_id)
    return _ResponseTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=val or None,
        data_collator=collator,
        processing_class=tok,
        optimizer_cls_and_kwargs=optimizer_spec(optimizer, weight_decay),
        callbacks=callbacks or [],
    )


def train_sft(args: argparse.Namespace, d: distlib.Dist) -> int:
    from transformers import AutoConfig

    device = device_of(args)
    tok = load_tokenizer(args.model)
    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise JobError(_load_hint(args.model, exc)) from exc
    context = memory.shape_of(config).n_positions or args.max_length
    data = prepare_data(args, tok, context)
    est, budget = plan_memory(args, config, data, device)
    run = open_run(args, d)
    out = run_path(args) / CHECKPOINTS
    if run is not None:
        run.log(
            "finetune %s on %s: %d train / %d val examples (%s), %d dropped as too long",
            args.model, args.dataset, len(data["train"]), len(data["val"]), data["kind"],
            data["dropped"],
        )  # fmt: skip
        run.update(
            kind=data["kind"],
            columns=data["columns"],
            examples={"train": len(data["train"]), "val": len(data["val"])},
            val_split=data["val_split"],
            memory_estimate={**est.as_dict(), "available_gib": round(budget / memory.GIB, 2)},
        )
    model = load_model(args, tok)
    sched = schedule(args, len(data["train"]), d.world_size)
    from remote.jobs.trainer_callbacks import MetricsCallback, StopOnSignal

    stop = StopOnSignal(d)
    metrics = MetricsCallback(run, world=d.world_size)
    trainer = make_trainer(
        model,
        tok,
        data["train"],
        data["val"],
        training_arguments(args, out, sched, device),
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        packing=args.packing,
        callbacks=[metrics, stop],
    )
    metrics.trainer = trainer
    resume_from = _resume_point(args, out, run)
    with stop.installed():
        trainer.train(resume_from_checkpoint=resume_from)
    peak = memory.peak_bytes(device)
    if stop.signum is not None:
        if run is not None:
            run.plot_loss()
            run.finish(rundir.INTERRUPTED, peak_memory_mb=round(peak / 2**20, 1))
            run.log("interrupted by signal %d at step %d", stop.signum, trainer.state.global_step)
        return 128 + stop.signum
    final = final_eval(trainer) if data["val"] else {}
    if run is not None:
        finish_run(run, trainer, tok, final, peak, out)
    distlib.barrier(d)
    return 0


def final_eval(trainer: Any) -> dict[str, float]:
    """The val loss at the last step: from the log if the Trainer just evaluated, else now."""
    step = trainer.state.global_step
    for row in reversed(trainer.state.log_history):
        if "eval_loss" in row and row.get("step") == step:
            return row
    return trainer.evaluate()


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-N`` with its trainer_state.json, which the Trainer writes last:
    a kill in the middle of saving leaves the one before it to resume from."""
    done = [
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in out.glob("checkpoint-*")
        if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return str(max(done)[1]) if done else None


def _resume_point(args: argparse.Namespace, out: Path, run: rundir.RunDir | None) -> str | None:
    if not args.resume:
        return None
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


def finish_run(
    run: rundir.RunDir, trainer: Any, tok: Any, final: dict, peak: int, ckpts: Path
) -> None:
    """Save the model where servers look for it, then close the run (manifest last)."""
    state = trainer.state
    save_model(trainer.model, tok, run.model_dir)
    run.plot_loss()
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    run.finish(
        rundir.COMPLETED,
        step=state.global_step,
        max_steps=state.max_steps,
        loss=losses[-1] if losses else None,
        val_loss=final.get("eval_loss"),
        peak_memory_mb=round(peak / 2**20, 1),
        tokens_trained=trainer.tokens_seen,
    )
    shutil.rmtree(ckpts, ignore_errors=True)  # for resuming only; the model is in model/
    run.write_manifest()
    run.log("model saved to %s", run.model_dir)


def save_model(model: Any, tok: Any, model_dir: Path) -> None:
    """A plain save_pretrained directory any server loads: LoRA merged, chat template set."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    shutil.rmtree(model_dir, ignore_errors=True)  # --overwrite: no stale file from before
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    save_tokenizer_with_chat_format(tok, model_dir)


if __name__ == "__main__":
    sys.exit(main())
