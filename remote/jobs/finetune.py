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
loss on the answer alone; see sft_batches.py for why it is several times faster than the course's
recipe. Before loading any weights it estimates the memory the run needs (memory.py) and stops
with the numbers if the machine does not have it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from facts import RunState
from remote.jobs import dist as distlib
from remote.jobs import memory, rundir
from remote.jobs.dataset import describe_presets, load_splits
from remote.jobs.errors import JobError
from remote.jobs.guard import Guard
from remote.jobs.models import add_lora, load_hint, load_tokenizer, pick_device, save_model
from remote.jobs.optimizers import OPTIMIZERS, optimizer_spec
from remote.jobs.packed_attention import use_packed_attention
from remote.jobs.sft_batches import (
    FlattenBatch,
    PadToLongest,
    rebalance,
    response_loss,
    tokenize_examples,
)

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
DPO_LR = 5e-6  # peak learning rate for --method dpo: a far smaller step than SFT
WARMUP_STEPS = 0  # linear warm-up, in optimizer steps
WEIGHT_DECAY = 0.0  # decoupled weight decay, on weight matrices (not biases, not LayerNorms)
MAX_LENGTH = 512  # tokens per example (cut beyond); never more than the model's context
DROPOUT = 0.0  # dropout while fine-tuning; GPT-2 pretrained with 0.1. 0: faster, and short runs
# on a few hundred examples do not need the noise (pass 0.1 to keep the pretraining value)
OPTIMIZER = "adamw"  # adamw | sgd | sgd-momentum | nesterov (optimizers.py)
LORA_RANK = 0  # 0 = full fine-tuning; R > 0 = LoRA adapters of rank R, merged at the end
LORA_ALPHA = 0  # LoRA scale numerator; 0 = 2 x rank
BETA = 0.1  # DPO: strength of the pull toward the reference model
LOGGING_STEPS = 5  # optimizer steps between train-loss rows
EVAL_STEPS = 0  # optimizer steps between val-loss rows; 0 = five evaluations per run
SAVE_STEPS = 0  # optimizer steps between checkpoints; 0 = same as evaluations
SEED = 1337  # data order, validation hold-out, LoRA init
REPORT_TO = "none"  # Trainer trackers: none | tensorboard | mlflow | wandb | all
BATCHING = "packed"  # packed | padded (sft_batches.py; the bench times both)
BATCHINGS = ("packed", "padded")
PRECISION = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16 on GPUs (fp16 if none), fp32 on CPUs
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m remote.jobs.finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="dataset presets:\n" + describe_presets(),
    )
    a = p.add_argument
    a("--model", default=MODEL, help=f"base model: hub id or local dir (default {MODEL})")
    a("--dataset", help=f"preset, local file or hub id (default {DATASET}; dpo: shipped pairs)")
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
    a("--lr", type=float, help=f"peak learning rate (default {LR}; LoRA {LORA_LR}; dpo {DPO_LR})")
    a("--warmup-steps", type=int, default=WARMUP_STEPS)
    a("--weight-decay", type=float, default=WEIGHT_DECAY)
    a("--max-length", type=int, default=MAX_LENGTH, help="tokens per example")
    a("--dropout", type=float, default=DROPOUT, help="dropout while training (GPT-2's is 0.1)")
    a("--optimizer", choices=OPTIMIZERS, default=OPTIMIZER)
    a(
        "--precision",
        choices=PRECISIONS,
        default=PRECISION,
        help="auto (default): mixed bf16 on GPUs, fp32 on CPUs; "
        "bf16 on a CPU with AVX512-BF16 or AMX trains ~1.6x faster",
    )
    a("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank; 0 = full fine-tuning")
    a("--lora-alpha", type=int, default=LORA_ALPHA, help="LoRA alpha (default 2 x rank)")
    a(
        "--batching",
        choices=BATCHINGS,
        default=BATCHING,
        help="packed (default): examples end to end, no padding; "
        "padded: each micro-batch padded to its longest",
    )
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
    dpo = args.method == "dpo"
    if args.lr is None:
        args.lr = DPO_LR if dpo else LORA_LR if args.lora_rank else LR
    if args.dataset is None:
        from remote.jobs.dpo import SHIPPED_PAIRS

        args.dataset = str(SHIPPED_PAIRS) if dpo else DATASET
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    return args


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 a user error (one ``error:`` line), 143/130 stopped by SIGTERM/SIGINT
    with a checkpoint to --resume from; see guard.py."""
    args = parse_args(argv)
    rundir.setup_logging(args.verbose)
    guard = Guard(distlib.setup())
    return guard.main(lambda: train(args, guard))


def train(args: argparse.Namespace, guard: Guard) -> int:
    if args.method == "dpo":
        from remote.jobs.dpo import train_dpo

        train_dpo(args, open_run(args, guard), guard.d)
        return 0
    return train_sft(args, guard)


def open_run(args: argparse.Namespace, guard: Guard) -> rundir.RunDir | None:
    """Create (or reopen with --resume) the run dir on rank 0; every rank learns its name, and
    every rank stops if rank 0 could not open it."""
    d = guard.d
    args.name = distlib.broadcast_object(args.name or time.strftime("finetune-%Y%m%d-%H%M%S"), d)
    opts = {"job": "finetune", "args": vars(args), "resume": args.resume}
    run = distlib.on_main(
        d, rundir.RunDir.create, args.runs_dir, args.name, **opts, overwrite=args.overwrite
    )
    return guard.track(run)


def run_path(args: argparse.Namespace) -> Path:
    return rundir.runs_root(args.runs_dir) / args.name


# --- the SFT job -------------------------------------------------------------------------------


def device_kind(args: argparse.Namespace) -> str:
    """ "cpu" or "cuda": the Trainer itself puts each torchrun rank on its own GPU."""
    return pick_device(args.device).partition(":")[0]


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
    half = device == "cuda" and precision(args, device) != "fp32"
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


def precision(args: argparse.Namespace, device: str) -> str:
    """The arithmetic of this run: fp32, or mixed bf16/fp16 (matmuls in 16 bits, the weights
    and the optimizer in fp32). A CPU stays fp32 unless asked: its bf16 is fast only where the
    hardware has it (``cpu_bf16_native``), and fp32 is what the course and every CPU computes."""
    if args.precision == "auto":
        return ("bf16" if _bf16_ok() else "fp16") if device == "cuda" else "fp32"
    if args.precision == "fp16" and device == "cpu":
        raise JobError("--precision fp16 needs a GPU; on a CPU use bf16 (AVX512-BF16/AMX) or fp32")
    if args.precision == "bf16" and device == "cuda" and not _bf16_ok():
        raise JobError("this GPU has no bf16: use --precision fp16 (or auto)")
    return args.precision


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so that mixed bf16
    beats fp32 instead of emulating it slower."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: say nothing rather than guess
        return False
    flags = {f for line in info.splitlines() if line.startswith("flags") for f in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def load_model(args: argparse.Namespace, tok: Any) -> Any:
    from remote.jobs.models import load_model as load

    model = load(args.model)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    return prepare_model(model, args)


def prepare_model(model: Any, args: argparse.Namespace) -> Any:
    """What training changes in a loaded model (the bench applies the same): GELU in one
    kernel, the dropout of ``--dropout``, no KV cache, per-example attention for packed
    batches, the fused lm_head and loss, LoRA adapters. None of it reaches the saved config."""
    from remote.jobs.models import fuse_gelu, set_dropout, sparse_tied_embedding
    from remote.jobs.vocab_loss import use_fused_head

    fuse_gelu(model)
    set_dropout(model, args.dropout)
    model.config.use_cache = False  # no KV cache while training
    if args.batching == "packed" and not use_packed_attention(model):
        args.batching = "padded"  # no per-example attention for this architecture: pad instead
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # both write gradients DDP cannot see
        if precision(args, device_kind(args)) == "fp32":  # mixed precision autocasts only
            use_fused_head(model)  # the model's own forward, which the fused head bypasses
        if not args.lora_rank:
            sparse_tied_embedding(model)
    if args.lora_rank:
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    return model


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


def common_arguments(args: argparse.Namespace, out: Path, sched: dict, device: str) -> dict:
    """The TrainingArguments that SFT and DPO (dpo.dpo_config) share: one reading of the flags."""
    arithmetic = precision(args, device)
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,  # on the Trainer's groups: not biases, not LayerNorms
        "max_steps": sched["total"],
        "warmup_steps": args.warmup_steps,
        "logging_steps": sched["log"],
        "eval_steps": sched["eval"],
        "save_strategy": "steps",
        "save_steps": sched["save"],
        "save_total_limit": 1,
        "report_to": [] if args.report_to == "none" else args.report_to.split(","),
        "seed": args.seed,
        "use_cpu": device == "cpu",
        "bf16": arithmetic == "bf16",
        "fp16": arithmetic == "fp16",
        "disable_tqdm": False,
    }


def training_arguments(args: argparse.Namespace, out: Path, sched: dict, device: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        **common_arguments(args, out, sched, device),
        lr_scheduler_type="linear",
        logging_first_step=True,
        eval_strategy="steps",
        data_seed=args.seed,
        train_sampling_strategy="random" if args.batching == "packed" else "group_by_length",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def make_trainer(
    model: Any,
    tok: Any,
    train: list[dict],
    val: list[dict],
    targs: Any,
    *,
    optimizer: str = OPTIMIZER,
    packing: bool = False,
    callbacks: list | None = None,
) -> Any:
    """A Trainer whose loss is ``sft_batches.response_loss``: lm_head only where labels are; each
    step's micro-batches re-cut for the least padding (``sft_batches.rebalance``); counting the
    real (non-padding) tokens it trains on and the shapes it computed."""
    from transformers import Trainer

    class _ResponseTrainer(Trainer):
        tokens_seen = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shapes: list[tuple[int, int]] = []  # (rows, length) of each micro-batch

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            return rebalance(batches, tok.pad_token_id), items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                real = mask.sum() if mask is not None else inputs["input_ids"].numel()
                self.tokens_seen += int(real)
                self.shapes.append(tuple(inputs["input_ids"].shape))
            loss = response_loss(model, inputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages; the count is global
            return (loss, {"loss": loss}) if return_outputs else loss

    if not val and targs.eval_strategy != "no":  # nothing held out: nothing to evaluate
        targs = dataclasses.replace(targs, eval_strategy="no")
    collator = FlattenBatch() if packing else PadToLongest(tok.pad_token_id)
    return _ResponseTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=val or None,
        data_collator=collator,
        processing_class=tok,
        optimizer_cls_and_kwargs=optimizer_spec(optimizer, targs.learning_rate),
        callbacks=callbacks or [],
    )


def train_sft(args: argparse.Namespace, guard: Guard) -> int:
    """Everything that can be wrong with the input fails before the run dir exists."""
    d = guard.d
    device = device_kind(args)
    tok = load_tokenizer(args.model)
    config = load_config(args.model)
    context = memory.shape_of(config).n_positions or args.max_length
    data = prepare_data(args, tok, context)
    est, budget = plan_memory(args, config, data, device)
    run = open_run(args, guard)
    out = run_path(args) / rundir.TRAINER_CHECKPOINTS
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
    if run is not None:
        arithmetic = precision(args, device)
        run.log("%s micro-batches of %d examples, %s", args.batching, args.batch_size, arithmetic)
        run.update(batching=args.batching, precision=arithmetic)
        if device == "cpu" and arithmetic == "fp32" and cpu_bf16_native():
            run.log("this CPU computes bf16 in hardware: --precision bf16 trains ~1.6x faster")
    sched = schedule(args, len(data["train"]), d.world_size)
    from remote.jobs.trainer_callbacks import MetricsCallback, StopOnSignal, resume_point

    stop = StopOnSignal(d)
    metrics = MetricsCallback(run, world=d.world_size)
    trainer = make_trainer(
        model,
        tok,
        data["train"],
        data["val"],
        training_arguments(args, out, sched, device),
        optimizer=args.optimizer,
        packing=args.batching == "packed",
        callbacks=[metrics, stop],
    )
    metrics.trainer = trainer
    resume_from = resume_point(out, run) if args.resume else None
    with stop.installed():
        trainer.train(resume_from_checkpoint=resume_from)
    peak_mb = round(memory.peak_bytes(device) / 2**20, 1)
    stop.raise_if_stopped(step=trainer.state.global_step, peak_memory_mb=peak_mb)
    final = final_eval(trainer) if data["val"] else {}
    if run is not None:
        finish_run(run, trainer, tok, final, peak_mb)
    distlib.barrier(d)
    return 0


def load_config(source: str) -> Any:
    """The model's config alone: enough to plan memory before any weight is loaded."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise JobError(load_hint(source, exc)) from exc


def final_eval(trainer: Any) -> dict[str, float]:
    """The val loss at the last step: from the log if the Trainer just evaluated, else now."""
    step = trainer.state.global_step
    for row in reversed(trainer.state.log_history):
        if "eval_loss" in row and row.get("step") == step:
            return row
    return trainer.evaluate()


def finish_run(run: rundir.RunDir, trainer: Any, tok: Any, final: dict, peak_mb: float) -> None:
    """Save the model where servers look for it, then close the run (manifest last)."""
    state = trainer.state
    save_model(trainer.model, tok, run.model_dir)
    run.plot_loss()
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    run.finish(
        RunState.COMPLETED,
        step=state.global_step,
        max_steps=state.max_steps,
        loss=losses[-1] if losses else None,
        val_loss=final.get("eval_loss"),
        peak_memory_mb=peak_mb,
        tokens_trained=trainer.tokens_seen,
    )
    shutil.rmtree(run.trainer_checkpoints, ignore_errors=True)  # for --resume only
    run.write_manifest()
    run.log("model saved to %s", run.model_dir)


if __name__ == "__main__":
    sys.exit(main())
