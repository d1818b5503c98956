"""`finetune`'s flags, SFT and ``--method dpo`` alike: one block of defaults, checked first.

    config = finetune.parse_args(["--dataset", "alpaca-1k", "--lora-rank", "16"])  # or exit 2
    config = finetune.parse_args(["--recipe", "course"])  # the handout's Part 2; flags still win

Every field of ``Config`` is a flag (flags.py). ``check`` refuses what is well-typed but unusable
(``--dropout 1.5``, ``--resume`` without ``--name``, a flag the chosen method would ignore)
with argparse's usage line and exit 2, before any file is read, any model downloaded or any
run directory made. ``resolve`` then fills in the defaults that depend on other flags (the
learning rate for LoRA or DPO, DPO's shipped pairs, the LoRA scale).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from facts import RUN_NAME_RULE, is_run_name
from remote.jobs import flags
from remote.jobs.dataset import DEFAULT_VAL_SIZE, DatasetError, describe_presets, parse_columns
from remote.jobs.optimizers import OPTIMIZERS

opt = flags.opt
PROG = "python -m remote.jobs.finetune"
SHIPPED_PAIRS = Path(__file__).resolve().parent / "data" / "preference_pairs.jsonl"
DATASET = "alpaca-1k"  # SFT's default; DPO's is SHIPPED_PAIRS
LR, LORA_LR, DPO_LR = 5e-5, 2e-4, 5e-6  # --lr's default: full fine-tuning, --lora-rank, dpo
METHODS = ("sft", "dpo")
BATCHINGS = ("packed", "padded", "max-length")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KEEPS = ("last", "best")


@dataclass
class Config:
    # what to train, and how
    model: str = opt("gpt2", "base model: hub id or local dir (e.g. runs/<pretrain>/model)")
    method: str = opt("sft", "sft, or dpo: chosen/rejected pairs from an SFT run", choices=METHODS)
    recipe: str | None = opt(None, "set a whole recipe's values (below)", choices=("course",))
    # data
    dataset: str | None = opt(
        None, f"preset, local file or hub id ({DATASET}; dpo: shipped pairs)", metavar="DATA"
    )
    columns: str | None = opt(
        None, "map columns to fields: instruction=COL,input=COL,output=COL", metavar="MAP"
    )
    text_column: str | None = opt(None, "train on this column's plain text", metavar="COL")
    limit: int | None = opt(None, "use only the first N rows (the course's Task 2)")
    val_size: int | None = opt(None, f"rows held out if no split (5%, at most {DEFAULT_VAL_SIZE})")
    val_fraction: float | None = opt(None, "...or this share of the rows, 0-1 (the course: 0.1)")
    max_length: int = opt(512, "tokens per example (cut beyond); never more than the context")
    batching: str = opt(
        "packed",
        "packed: examples end to end, no padding; padded: each micro-batch padded to its "
        "longest; max-length: every example padded to --max-length, as the course",
        choices=BATCHINGS,
    )
    # optimisation
    max_steps: int = opt(100, "optimizer steps, the course's 100; 0: --epochs over the data")
    epochs: float = opt(1.0, "passes over the data when --max-steps 0")
    batch_size: int = opt(4, "examples per micro-batch, per process")
    grad_accum: int = opt(4, "micro-batches per optimizer step: 16 examples, as the course")
    lr: float | None = opt(
        None, f"peak learning rate, linear decay ({LR}; LoRA {LORA_LR}; dpo {DPO_LR})"
    )
    warmup_steps: int = opt(0, "linear warm-up, in optimizer steps")
    weight_decay: float = opt(0.0, "decoupled, on weight matrices only (not biases, LayerNorms)")
    # GPT-2 pretrained with 0.1; 0 is faster, and short runs on a few hundred examples do not need
    # the noise (pass 0.1 to keep the pretraining value).
    dropout: float = opt(0.0, "dropout while fine-tuning, 0 to <1 (GPT-2's own is 0.1)")
    optimizer: str = opt("adamw", "optimizers.py", choices=OPTIMIZERS)
    precision: str = opt(
        "auto",
        "auto: mixed bf16 on GPUs (fp16 if none), fp32 on CPUs; bf16 on a CPU with "
        "AVX512-BF16 or AMX trains ~1.6x faster",
        choices=PRECISIONS,
    )
    lora_rank: int = opt(
        0, "0: full fine-tuning; R > 0: LoRA adapters of rank R, merged at the end"
    )
    lora_alpha: int = opt(0, "LoRA scale numerator; 0: 2 x rank")
    beta: float = opt(0.1, "dpo: strength of the pull toward the reference model")
    # evaluation, checkpoints, logging
    logging_steps: int = opt(5, "optimizer steps between train-loss rows")
    eval_steps: int = opt(0, "optimizer steps between val-loss rows; 0: five per run")
    save_steps: int = opt(0, "optimizer steps between checkpoints; 0: at each evaluation")
    keep: str = opt(
        "last", "model/ gets the last step's weights or the best val loss's", choices=KEEPS
    )
    report_to: str = opt(
        "none", "Trainer trackers: none, tensorboard, mlflow, wandb, all", metavar="LIST"
    )
    # memory (memory.py)
    memory_limit_gb: float | None = opt(None, "plan for a machine with this much memory, GiB")
    no_memory_check: bool = opt(False, "train even when the estimate says it will not fit")
    # common job flags
    name: str | None = opt(None, "run name (default finetune-YYYYmmdd-HHMMSS)")
    runs_dir: str | None = opt(
        None, "runs root (default $TINYCLOUD_RUNS, else ./runs)", metavar="DIR"
    )
    resume: bool = opt(False, "continue the run --name from its last checkpoint")
    overwrite: bool = opt(False, "start the run --name again from scratch")
    seed: int = opt(1337, "data order, validation hold-out, LoRA init")
    device: str = opt("auto", "where to train", choices=("auto", "cpu", "cuda"))
    verbose: bool = opt(False, "debug logging")


# The handout's Part 2, exactly (docs/finetune.md sets it beside the defaults above and says why
# those differ). The prompt format and the loss on the answer alone stay tinycloud's: the served
# model must answer in the format its chat template sends, and stop.
RECIPES = {
    "course": {
        "model": "gpt2",
        "dataset": "alpaca-1k",
        "max_steps": 100,
        "batch_size": 4,
        "grad_accum": 4,
        "lr": 1e-5,
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "optimizer": "adamw",
        "precision": "fp32",
        "dropout": 0.1,  # GPT-2's own: the course's Trainer does not change it
        "lora_rank": 0,
        "max_length": 256,
        "batching": "max-length",  # padding="max_length": every example 256 tokens
        "val_fraction": 0.1,  # train_test_split(test_size=0.1): 900 / 100 rows
        "eval_steps": 100,
        "save_steps": 100,
        "keep": "best",  # load_best_model_at_end by eval loss
    }
}

# What DPO does not use, and why; giving one with --method dpo is an error, not a silent no-op.
DPO_UNUSED = {
    "dropout": "trl trains DPO with dropout off",
    "val_size": "DPO holds out 10% of the pairs itself (from 10 pairs on)",
    "val_fraction": "DPO holds out 10% of the pairs itself (from 10 pairs on)",
    "text_column": "DPO reads chosen/rejected pairs (map them with --columns)",
    "batching": "trl batches the pairs itself",
    "memory_limit_gb": "the memory estimate covers SFT only",
    "no_memory_check": "the memory estimate covers SFT only",
    "recipe": "--recipe course is the handout's SFT (Part 2)",
}
SFT_UNUSED = {"beta": "--beta is DPO's (--method dpo)"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(c: Config, given: set[str] | None = None) -> str | None:
    """Well-typed but unusable values, and flags the method would ignore; exit 2 via argparse."""
    given = given or set()
    for key in ("batch_size", "grad_accum", "max_length", "logging_steps"):
        if getattr(c, key) < 1:
            return f"{_flag(key)} must be at least 1"
    for key in ("max_steps", "warmup_steps", "eval_steps", "save_steps", "lora_rank", "lora_alpha"):
        if getattr(c, key) < 0:
            return f"{_flag(key)} cannot be negative"
    if not 0 <= c.dropout < 1:
        return f"--dropout must be in [0, 1), not {c.dropout}: it is the share of units dropped"
    if c.epochs <= 0 or (c.lr is not None and c.lr <= 0) or c.beta <= 0:
        return "--epochs, --lr and --beta must be positive"
    if c.weight_decay < 0:
        return "--weight-decay cannot be negative"
    if c.limit is not None and c.limit < 1:
        return "--limit must be at least 1 (leave it out to use every row)"
    if c.val_size is not None and c.val_size < 0:
        return "--val-size cannot be negative (0: no validation)"
    if c.val_fraction is not None and not 0 < c.val_fraction < 1:
        return "--val-fraction must be between 0 and 1, e.g. 0.1 for a 90/10 split"
    if "val_size" in given and "val_fraction" in given:
        return "give --val-size or --val-fraction, not both"
    if c.memory_limit_gb is not None and c.memory_limit_gb <= 0:
        return "--memory-limit-gb must be positive"
    if c.columns:
        try:
            parse_columns(c.columns)
        except DatasetError as exc:
            return str(exc)
    return _check_run(c) or _check_keep(c) or _check_method(c, given)


def _check_run(c: Config) -> str | None:
    if c.resume and c.overwrite:
        return "give --resume or --overwrite, not both"
    if c.resume and not c.name:
        return "--resume needs --name: the run to continue"
    if c.name is not None and not is_run_name(c.name):
        return f"bad run name {c.name!r}: use {RUN_NAME_RULE}"
    return None


def _check_keep(c: Config) -> str | None:
    if c.keep != "best":
        return None
    if c.val_size == 0:
        return (
            "--keep best picks by validation loss, so it needs validation rows: drop --val-size 0"
        )
    if c.eval_steps and c.save_steps and c.save_steps % c.eval_steps:
        return (
            "--keep best keeps a checkpoint per evaluation: make --save-steps a multiple of "
            "--eval-steps"
        )
    return None


def _check_method(c: Config, given: set[str]) -> str | None:
    unused = DPO_UNUSED if c.method == "dpo" else SFT_UNUSED
    wrong = sorted(given & set(unused))
    if not wrong:
        return None
    why = "; ".join(dict.fromkeys(unused[k] for k in wrong))
    names = ", ".join(_flag(k) for k in wrong)
    them = "them" if len(wrong) > 1 else "it"
    return f"--method {c.method} does not use {names} ({why}). Drop {them}"


def resolve(c: Config) -> Config:
    """The defaults that depend on other flags, filled in."""
    dpo = c.method == "dpo"
    return dataclasses.replace(
        c,
        lr=c.lr if c.lr is not None else DPO_LR if dpo else LORA_LR if c.lora_rank else LR,
        dataset=c.dataset or (str(SHIPPED_PAIRS) if dpo else DATASET),
        lora_alpha=c.lora_alpha or 2 * c.lora_rank,
    )


def parse(argv: list[str] | None, description: str) -> Config:
    """The checked, resolved config; a bad flag exits 2 with argparse's usage line."""
    c, _given = flags.parse(
        Config,
        argv,
        prog=PROG,
        description=description,
        check=check,
        recipes=RECIPES,
        epilog="dataset presets:\n" + describe_presets(),
    )
    return resolve(c)
