"""Fine-tune a causal language model (GPT-2 by default) on instructions, dialogues or plain text.

    python -m remote.jobs.finetune --dataset alpaca-1k                  # the course's Part 2
    python -m remote.jobs.finetune --recipe course --name part2         # ...with its exact values
    python -m remote.jobs.finetune --dataset alpaca-1k --limit 200 --name alpaca-200   # Task 2
    python -m remote.jobs.finetune --dataset netflix --model EleutherAI/gpt-neo-125m  # Part 3
    python -m remote.jobs.finetune --model runs/my-pretrain/model --dataset my.jsonl \\
        --columns instruction=question,output=answer --lora-rank 16 --keep best
    python -m remote.jobs.finetune --method dpo --dataset hh-rlhf --model runs/sft/model
    torchrun --nproc_per_node=2 -m remote.jobs.finetune ...             # DDP, unchanged

It writes ``runs/<name>/`` (see rundir.py): run.json with progress, time, cost and peak memory,
metrics.jsonl, loss.png, and ``model/``, a plain ``save_pretrained`` directory (LoRA is merged
in; the last step's weights, or with --keep best the best evaluation's) whose tokenizer carries
the chat template of prompts.py, so TGI and the native server both serve it. Instruction data is
trained in the Alpaca format with EOS closing every answer and loss on the answer alone; see
sft_batches.py for why it is several times faster than the course's recipe.

Cheap checks come first: the flags (finetune_flags.py), then the model path, the dataset and its
columns, then the tokenizer and the examples, then the memory the run needs (memory.py); only
then is the run directory made and the weights loaded. The Trainer set-up that DPO (dpo.py)
shares is trainer_setup.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from facts import RunKey, RunState
from remote.jobs import dist as distlib
from remote.jobs import memory, rundir
from remote.jobs.dataset import Rows, load_splits
from remote.jobs.dpo import train_dpo
from remote.jobs.errors import Interrupted, JobError
from remote.jobs.finetune_flags import Config, parse
from remote.jobs.guard import Guard
from remote.jobs.models import add_lora, check_source, load_hint, load_tokenizer, save_model
from remote.jobs.optimizers import optimizer_spec
from remote.jobs.packed_attention import (
    can_share_prefixes,
    follows_segment_tree,
    use_packed_attention,
)
from remote.jobs.sft_batches import (
    FlattenBatch,
    PadToLongest,
    attention_spans,
    merge_packed,
    rebalance,
    response_loss,
    share_prefixes,
    tokenize_examples,
)
from remote.jobs.signals import StopSignal
from remote.jobs.trainer_setup import (
    common_arguments,
    cpu_bf16_native,
    device_kind,
    final_eval,
    kept_step,
    need_validation_for_keep_best,
    open_run,
    precision,
    run_path,
    schedule,
)

# The flags and their defaults: finetune_flags.Config (SFT and --method dpo alike).
MAX_LENGTH = Config.max_length  # tokens per example by default (the bench tokenizes to it)
OPTIMIZER = Config.optimizer


def parse_args(argv: list[str] | None = None) -> Config:
    """The checked config (exit 2 on a bad flag), the defaults that depend on others filled in."""
    return parse(argv, __doc__)


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 a user error (one ``error:`` line), 2 a bad flag, 143/130 stopped by
    SIGTERM/SIGINT with a checkpoint to --resume from; see guard.py."""
    c = parse_args(argv)
    rundir.setup_logging(c.verbose)
    guard = Guard(distlib.setup())
    return guard.main(lambda: train(c, guard))


def train(c: Config, guard: Guard) -> int:
    """SFT, or DPO (dpo.py). SIGTERM/SIGINT are caught from here on: one arriving while the
    data or the model loads stops the job as soon as it can, as interrupted, not killed."""
    with StopSignal() as stop:
        if c.method == "dpo":
            return train_dpo(c, guard, stop)
        return train_sft(c, guard, stop)


# --- the SFT job -------------------------------------------------------------------------------


@dataclass
class SftData:
    """Token ids and labels for training and validation, and what they came from."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    kind: str  # dataset.py's kind of rows: instruction, text or dialogue
    columns: dict[str, str]
    val_split: str  # the dataset's own split, or "held-out"
    dropped: int  # examples whose prompt left no room for an answer
    max_len: int

    @property
    def train_tokens(self) -> int:
        return sum(len(f["input_ids"]) for f in self.train)

    @property
    def longest(self) -> int:
        return max(len(f["input_ids"]) for f in self.train)


def read_rows(c: Config) -> tuple[Rows, Rows]:
    """The dataset's rows, mapped and split: a missing file, an unknown preset or a wrong column
    fails here, before any model is downloaded or loaded."""
    return load_splits(
        c.dataset,
        limit=c.limit,
        columns=c.columns,
        text_column=c.text_column,
        val_size=c.val_size,
        val_fraction=c.val_fraction,
        seed=c.seed,
    )


def prepare_data(c: Config, rows: tuple[Rows, Rows], tok: Any, context: int) -> SftData:
    """Rows -> formatted text -> token ids and labels, for train and validation."""
    train_rows, val_rows = rows
    max_len = min(c.max_length, context)
    train, dropped = tokenize_examples(tok, train_rows.examples(tok.eos_token), max_len)
    val, _ = tokenize_examples(tok, val_rows.examples(tok.eos_token), max_len)
    if not train:
        raise JobError(
            f"no usable training examples in {c.dataset!r} ({dropped} dropped: every prompt "
            f"is {max_len} tokens or longer, or every answer is empty). Raise --max-length"
        )
    kind, columns = train_rows.kind, train_rows.columns
    return SftData(train, val, kind, columns, val_rows.split, dropped, max_len)


def plan_memory(c: Config, config: Any, data: SftData, device: str) -> Any:
    """Estimate this run's memory from the model config and the longest examples; stop now
    (MemoryEstimateError) if the machine cannot hold it."""
    shape = memory.shape_of(config)
    longest = sorted(data.train, key=lambda f: len(f["input_ids"]))[-c.batch_size :]
    seq_len = len(longest[-1]["input_ids"])
    if c.batching == "max-length":  # every example padded to the same length
        seq_len = data.max_len
    loss_tokens = sum(sum(x != -100 for x in f["labels"]) for f in longest)
    half = device == "cuda" and precision(c, device) != "fp32"
    est = memory.estimate(
        shape,
        batch_size=c.batch_size,
        seq_len=seq_len,
        loss_tokens=loss_tokens,
        optimizer=c.optimizer,
        lora_rank=c.lora_rank,
        activation_bytes=2 if half else 4,
    )
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
    budget, source = memory.available(device, limit_gib=c.memory_limit_gb, procs=procs)
    if not c.no_memory_check:
        memory.check(shape, est, budget, source, grad_accum=c.grad_accum)
    return est, budget


def load_model(c: Config, tok: Any) -> Any:
    from remote.jobs.models import load_model as load

    model = load(c.model)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    return prepare_model(model, c)


def prepare_model(model: Any, c: Config) -> Any:
    """What training changes in a loaded model (the bench applies the same): GELU in one
    kernel, the dropout of ``--dropout``, no KV cache, per-example attention for packed
    batches, the fused lm_head and loss, LoRA adapters. None of it reaches the saved config."""
    from remote.jobs.models import fuse_gelu, set_dropout, sparse_tied_embedding
    from remote.jobs.vocab_loss import use_fused_head

    fuse_gelu(model)
    set_dropout(model, c.dropout)
    model.config.use_cache = False  # no KV cache while training
    if c.batching == "packed" and not use_packed_attention(model):
        c.batching = "padded"  # no per-example attention for this architecture: pad instead
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # both write gradients DDP cannot see
        if precision(c, device_kind(c)) == "fp32":  # mixed precision autocasts only
            use_fused_head(model)  # the model's own forward, which the fused head bypasses
        if not c.lora_rank:
            sparse_tied_embedding(model)
    if c.lora_rank:
        model = add_lora(model, c.lora_rank, c.lora_alpha)
    return model


def training_arguments(c: Config, out: Any, sched: dict, device: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        **common_arguments(c, out, sched, device),
        lr_scheduler_type="linear",
        logging_first_step=True,
        eval_strategy="steps",
        data_seed=c.seed,
        train_sampling_strategy="group_by_length" if c.batching == "padded" else "random",
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
    pad_to: int = 0,
    pack_tokens: int = 0,
    share: bool | None = None,
    callbacks: list | None = None,
) -> Any:
    """A Trainer whose loss is ``sft_batches.response_loss``: lm_head only where labels are; each
    step's micro-batches re-cut for the least padding (``sft_batches.rebalance``) unless every
    example is padded to ``pad_to`` tokens, or, packed, joined into rows of up to
    ``pack_tokens`` (``sft_batches.merge_packed``; 0: one row per micro-batch) whose shared
    prompt beginnings are computed once (``sft_batches.share_prefixes``; ``share`` None: where
    the model allows it); counting the real (non-padding) tokens it trains on and the shapes
    and attention spans it computed."""
    import torch
    from transformers import Trainer

    share_eval = packing and follows_segment_tree(model) and share is not False
    if share is None:
        share = can_share_prefixes(model)

    class _ResponseTrainer(Trainer):
        tokens_seen = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shapes: list[tuple[int, int]] = []  # (rows, length) of each micro-batch
            self.spans: list[tuple[int, int]] = []  # (queries, keys) of each attention

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
            for b in batches:  # counted here, before shared prefixes leave fewer tokens
                mask = b.get("attention_mask")
                self.tokens_seen += int(mask.sum() if mask is not None else b["input_ids"].numel())
            if not packing:
                return (batches if pad_to else rebalance(batches, tok.pad_token_id)), items
            shape = share_prefixes if share else None
            if pack_tokens:  # the cap counts the tokens computed: after sharing
                return merge_packed(batches, pack_tokens, shape), items
            return ([shape(b) for b in batches] if shape else batches), items

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not inputs:  # merge_packed moved its examples into a later micro-batch
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.shapes.append(tuple(inputs["input_ids"].shape))
                self.spans += attention_spans(inputs)
            elif share_eval:  # no dropout when evaluating: shared prefixes change nothing
                inputs = share_prefixes(inputs)
            loss = response_loss(model, inputs, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages; the count is global
            return (loss, {"loss": loss}) if return_outputs else loss

    if not val and targs.eval_strategy != "no":  # nothing held out: nothing to evaluate
        targs = dataclasses.replace(targs, eval_strategy="no")
    collator = FlattenBatch() if packing else PadToLongest(tok.pad_token_id, at_least=pad_to)
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


def train_sft(c: Config, guard: Guard, stop: StopSignal) -> int:
    """Cheap checks first: the flags (already), the model path, the dataset and its columns,
    then the tokenizer, the examples and the memory plan; only then the run dir and the weights."""
    d = guard.d
    check_source(c.model)
    rows = read_rows(c)
    device = device_kind(c)
    arithmetic = precision(c, device)
    tok = load_tokenizer(c.model)
    config = load_config(c.model)
    context = memory.shape_of(config).n_positions or c.max_length
    data = prepare_data(c, rows, tok, context)
    need_validation_for_keep_best(
        c, len(data.val), f"{c.dataset!r} left no validation rows", "Give more rows or --val-size N"
    )
    sched = schedule(c, len(data.train), d.world_size)
    est, budget = plan_memory(c, config, data, device)
    run = open_run(c, guard)
    if run is not None:
        describe(run, c, data, est, budget)
    model = load_model(c, tok)
    if run is not None:
        run.log("%s micro-batches of %d examples, %s", c.batching, c.batch_size, arithmetic)
        run.update(batching=c.batching, precision=arithmetic)
        if device == "cpu" and arithmetic == "fp32" and cpu_bf16_native():
            run.log("this CPU computes bf16 in hardware: --precision bf16 trains ~1.6x faster")
    from remote.jobs.trainer_callbacks import MetricsCallback, StopOnSignal, resume_point

    out = run_path(c) / rundir.TRAINER_CHECKPOINTS
    stopper = StopOnSignal(d, stop)
    metrics = MetricsCallback(run, world=d.world_size)
    trainer = make_trainer(
        model,
        tok,
        data.train,
        data.val,
        training_arguments(c, out, sched, device),
        optimizer=c.optimizer,
        packing=c.batching == "packed",
        pad_to=data.max_len if c.batching == "max-length" else 0,
        pack_tokens=c.batch_size * data.longest,  # what plan_memory planned a micro-batch for
        callbacks=[metrics, stopper],
    )
    metrics.trainer = trainer
    resume_from = resume_point(out, run) if c.resume else None
    if stop.signum:  # asked to stop while setting up: nothing new to save yet
        raise Interrupted(stop.signum)
    trainer.train(resume_from_checkpoint=resume_from)
    peak_mb = round(memory.peak_bytes(device) / 2**20, 1)
    stopper.raise_if_stopped(step=trainer.state.global_step, peak_memory_mb=peak_mb)
    final = final_eval(trainer) if data.val else {}
    if run is not None:
        finish_run(run, c, trainer, tok, final, peak_mb)
    distlib.barrier(d)
    return 0


def describe(run: rundir.RunDir, c: Config, data: SftData, est: Any, budget: float) -> None:
    run.log(
        "finetune %s on %s: %d train / %d val examples (%s), %d dropped as too long",
        c.model, c.dataset, len(data.train), len(data.val), data.kind, data.dropped,
    )  # fmt: skip
    run.update(
        kind=data.kind,
        columns=data.columns,
        examples={"train": len(data.train), "val": len(data.val)},
        val_split=data.val_split,
        memory_estimate={**est.as_dict(), "available_gib": round(budget / memory.GIB, 2)},
        **{RunKey.TRAIN_EXAMPLES: len(data.train), RunKey.TRAIN_TOKENS: data.train_tokens},
    )


def load_config(source: str) -> Any:
    """The model's config alone: enough to plan memory before any weight is loaded."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise JobError(load_hint(source, exc)) from exc


def finish_run(
    run: rundir.RunDir, c: Config, trainer: Any, tok: Any, final: dict, peak_mb: float
) -> None:
    """Save the model where servers look for it, then close the run (manifest last)."""
    state = trainer.state
    kept = kept_step(c, trainer)
    save_model(trainer.model, tok, run.model_dir)
    run.plot_loss()
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    run.finish(
        RunState.COMPLETED,
        **{
            RunKey.STEP: state.global_step,
            RunKey.MAX_STEPS: state.max_steps,
            RunKey.LOSS: losses[-1] if losses else None,
            RunKey.VAL_LOSS: final.get("eval_loss"),
            RunKey.FINAL_VAL_LOSS: final.get("eval_loss"),
            RunKey.KEPT_STEP: kept,
        },
        peak_memory_mb=peak_mb,
        tokens_trained=trainer.tokens_seen,
    )
    shutil.rmtree(run.trainer_checkpoints, ignore_errors=True)  # for --resume only
    run.write_manifest()
    if kept != state.global_step:
        run.log("--keep best: model/ holds step %d's weights", kept)
    run.log("model saved to %s", run.model_dir)


if __name__ == "__main__":
    sys.exit(main())
