"""Pretrain a GPT-2 on a text corpus: the course's Part 1, as a loop you can read in one go.

    python -m remote.jobs.pretrain --name tiny                  # shipped corpus, 4/4/128/64
    python -m remote.jobs.pretrain --name tiny --resume         # carry on from its ckpt.pt
    python -m remote.jobs.pretrain --corpus notes/ book.txt --max-steps 5000
    python -m remote.jobs.pretrain --hf-dataset roneneldan/TinyStories --text-column text
    python -m remote.jobs.pretrain --init gpt2 --lr 6e-5 --max-steps 500   # from GPT-2's weights
    python -m remote.jobs.pretrain --recipe course --name part1   # the handout's Part 1 values
    torchrun --nproc_per_node=2 -m remote.jobs.pretrain --name ddp  # 2 processes, gloo on CPU

nanoGPT's loop on transformers' GPT2LMHeadModel: AdamW with weight decay on 2-D weights only,
the learning rate set by hand on every param_group from a warmup + cosine schedule, gradient
accumulation, the next batch loaded on a thread while this one trains, an evaluation every
--eval-interval steps (best val loss kept, a sample printed, ckpt.pt written atomically), and
SIGTERM/SIGINT saving a checkpoint before exiting. Everything lands in runs/<name>/ (see
rundir.py); model/ is a complete Hugging Face directory for `finetune`, TGI or serving, holding
the last step's weights or, with --keep best, the best evaluation's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facts import BEST_WEIGHTS, RunKey, RunState, duration
from remote.jobs import corpus, dist, flags, rundir
from remote.jobs.errors import Interrupted, JobError
from remote.jobs.guard import Guard
from remote.jobs.models import fuse_gelu, pick_device
from remote.jobs.signals import StopSignal
from remote.jobs.windows import TRAIN_STREAM, VAL_STREAM, Prefetcher, Windows, train_keys

# --- defaults: one per line; every field is also a --flag ---------------------------------------
opt = flags.opt
DTYPES = ("auto", "float32", "bfloat16")
KEEPS = ("last", "best")


@dataclass(frozen=True)
class Config:
    # run
    name: str | None = opt(None, "run name (default pretrain-YYYYmmdd-HHMMSS)")
    runs_dir: str | None = opt(None, "runs root (default $TINYCLOUD_RUNS, else ./runs)")
    resume: bool = opt(False, "continue run --name from its last checkpoint")
    overwrite: bool = opt(False, "start run --name again, deleting its checkpoint and metrics")
    recipe: str | None = opt(None, "set a whole recipe's values (below)", choices=("course",))
    seed: int = opt(1337, "seeds the weights, the data order and the samples")
    device: str = opt("auto", "where to train", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "auto: bfloat16 on a GPU that has it", choices=DTYPES)
    # data
    corpus: tuple[str, ...] = opt((), "text files or .txt folders (default: shipped corpus)")
    hf_dataset: str | None = opt(None, "HF id, .jsonl/.csv/.parquet/.txt, saved dir", metavar="ID")
    text_column: str = opt("text", "the --hf-dataset column holding the text", metavar="COL")
    hf_split: str = opt("train", "the --hf-dataset split to read")
    tokenizer: str = opt("gpt2", "id or dir; 'bpe' or offline: train a BPE on the corpus")
    vocab_size: int = opt(4096, "tokens in the offline BPE's vocabulary, 257-65536")
    # model
    init: str = opt("scratch", "scratch, gpt2, or a GPT-2 model dir/id to start from")
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(128, "embedding width; a multiple of --n-head")
    block_size: int = opt(64, "tokens of context per training window")
    dropout: float = opt(0.0, "0 to <1; 0 is usual for pretraining")
    # optimisation
    max_steps: int = opt(2000, "optimizer steps in all")
    batch_size: int = opt(16, "windows per micro-batch, per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "peak learning rate (try 6e-5 with --init gpt2)")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine")
    warmup_steps: int = opt(100, "steps of linear warmup")
    lr_decay_steps: int = opt(0, "steps of cosine decay; 0: --max-steps (keep when extending)")
    weight_decay: float = opt(0.1, "AdamW weight decay, on 2-D weights only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0: off")
    # evaluation and logging
    eval_interval: int = opt(200, "steps between evaluations (each writes ckpt.pt)")
    eval_iters: int = opt(20, "batches per evaluation")
    keep: str = opt(
        "last", "model/ gets the last step's weights or the best val loss's", choices=KEEPS
    )
    log_interval: int = opt(10, "steps between log lines and metrics rows")
    sample_prompt: str = opt("A language model", "prompt for the samples at eval time")
    sample_tokens: int = opt(48, "new tokens per sample; 0: no samples")
    sample_temperature: float = opt(0.8, "sampling temperature of those samples, > 0")
    sample_top_k: int = opt(40, "sample among the k likeliest tokens; 0: all")


# The handout's Part 1, exactly (docs/pretrain.md sets it beside the defaults above and says
# why those differ). The shape and the tokenizer are the defaults already; written here too so
# the recipe stays the course's if a default moves. What the handout does not set (warm-up,
# AdamW's betas and decay, clipping) stays as above.
RECIPES = {
    "course": {
        "init": "scratch",
        "tokenizer": "gpt2",
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 64,
        "batch_size": 12,
        "grad_accum": 1,
        "lr": 6e-5,
        "min_lr": 6e-6,
        "lr_decay_steps": 1500,  # cosine from 6e-5 down to 6e-6 by step 1500, then flat
        "max_steps": 2000,
        "eval_interval": 1000,
        "eval_iters": 100,
        "sample_temperature": 0.1,
        "sample_top_k": 10,
    }
}


# On --resume these may differ from the checkpoint's config; the rest decide the model, the data
# or the schedule already half run, so they come from the checkpoint.
RESUMABLE = frozenset(
    {"name", "runs_dir", "resume", "overwrite", "max_steps", "lr_decay_steps", "eval_interval"}
    | {"eval_iters", "log_interval", "device", "dtype", "sample_prompt", "sample_tokens"}
    | {"sample_temperature", "sample_top_k"}
)
SHAPE = ("n_layer", "n_head", "n_embd")  # come from the weights with --init other than scratch
TOKENIZER_DIR = "tokenizer"  # in the run dir, so --resume tokenizes exactly as before
CACHE_DIR = Path(".cache") / "tokens"  # under the runs root, shared by runs on the same data

log = logging.getLogger("tinycloud.pretrain")


def check_config(c: Config, given: set[str] | None = None) -> str | None:
    """Well-typed but unusable values; argparse reports them (exit 2)."""
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum"):
        if getattr(c, key) < 1:
            return f"--{key.replace('_', '-')} must be at least 1"
    for key in ("max_steps", "eval_interval", "eval_iters", "log_interval", "lr"):
        if getattr(c, key) <= 0:
            return f"--{key.replace('_', '-')} must be positive"
    if c.n_embd % c.n_head:
        return f"--n-embd {c.n_embd} must be a multiple of --n-head {c.n_head}"
    if not 0 <= c.dropout < 1:
        return "--dropout must be in [0, 1)"
    if not 0 <= c.min_lr <= c.lr:
        return "--min-lr must be between 0 and --lr"
    if min(c.warmup_steps, c.lr_decay_steps, c.sample_tokens, c.weight_decay, c.grad_clip) < 0:
        return (
            "--warmup-steps, --lr-decay-steps, --sample-tokens, --weight-decay, --grad-clip: >= 0"
        )
    if c.sample_temperature <= 0 or c.sample_top_k < 0:
        return "--sample-temperature must be positive and --sample-top-k at least 0"
    if not 257 <= c.vocab_size <= 1 << 16:
        return "--vocab-size must be between 257 (the bytes + end-of-text) and 65536"
    if c.corpus and c.hf_dataset:
        return "give --corpus or --hf-dataset, not both"
    if c.resume and c.overwrite:
        return "give --resume or --overwrite, not both"
    if c.resume and not c.name:
        return "--resume needs --name: the run to continue"
    return None


# --- the pieces the loop uses ------------------------------------------------------------


def get_lr(step: int, c: Config) -> float:
    """Linear warmup, cosine down to min_lr at lr_decay_steps (default max_steps), then flat."""
    decay = c.lr_decay_steps or c.max_steps
    if step < c.warmup_steps:
        return c.lr * (step + 1) / (c.warmup_steps + 1)
    if step >= decay:
        return c.min_lr
    ratio = (step - c.warmup_steps) / max(1, decay - c.warmup_steps)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.lr - c.min_lr)


def configure_optimizer(model, c: Config, device):
    """AdamW, decaying only matrices: biases and LayerNorm gains are not weights to shrink."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # One fused kernel per parameter group on CPU and CUDA (as optimizers.py does for the
    # Trainer jobs); other devices keep the default implementation.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=fused)


def rng_state() -> dict[str, Any]:
    """Every generator the loop can draw from, as plain data (loads with weights_only)."""
    import torch

    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [key.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if not path.exists():
        raise JobError(
            f"no checkpoint at {path}: the run stopped before its first evaluation. "
            f"Start it again with --overwrite"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_config(c: Config, given: set[str], saved: dict[str, Any]) -> Config:
    """The checkpoint's config, with the flags that may change taken from the command line."""
    fixed = sorted(k for k in given - RESUMABLE if saved.get(k) != _plain(getattr(c, k)))
    if fixed:
        flag = "--" + fixed[0].replace("_", "-")
        raise JobError(
            f"{flag} cannot change on --resume (the checkpoint has {saved.get(fixed[0])!r}). "
            f"Drop the flag to continue the run, or start a new run with another --name"
        )
    return flags.replace_from(c, saved, keep=given & RESUMABLE | {"resume", "name", "runs_dir"})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- data, tokenizer and model -------------------------------------------------------------------


def read_corpus(c: Config) -> list[corpus.Document]:
    if c.hf_dataset:
        return corpus.read_hf_dataset(c.hf_dataset, c.text_column, c.hf_split)
    return corpus.read_files(list(c.corpus) or [corpus.SHIPPED_CORPUS])


def get_tokenizer(c: Config, docs: list[corpus.Document], saved: Path | None):
    """The run's own tokenizer on resume; the pretrained one with --init; else --tokenizer,
    falling back to a BPE trained on the corpus when it cannot be loaded (offline)."""
    from remote.jobs.tokenizer import load_tokenizer, train_bpe

    if saved is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    texts = [d.text for d in docs]
    if c.init != "scratch":
        return _pretrained(c.init, "AutoTokenizer")
    if c.tokenizer == "bpe":
        return train_bpe(texts, vocab_size=c.vocab_size)
    return load_tokenizer(c.tokenizer, texts, vocab_size=c.vocab_size)


def _pretrained(name: str, kind: str, **kwargs):
    import transformers

    cls = getattr(transformers, kind)
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise JobError(
            f"cannot load --init {name!r} ({first}). It needs network access once (then it is "
            f"cached), or use --init scratch"
        ) from None


def build_model(c: Config, vocab_size: int, eos: int, model_args: dict | None = None):
    """From the checkpoint's own config, from pretrained weights, or fresh from the flags;
    GELU in one kernel (models.fuse_gelu)."""
    model = _build_model(c, vocab_size, eos, model_args)
    fuse_gelu(model)
    return model


def _build_model(c: Config, vocab_size: int, eos: int, model_args: dict | None):
    from transformers import GPT2Config, GPT2LMHeadModel

    if model_args is not None:
        return GPT2LMHeadModel(GPT2Config.from_dict(model_args))
    drop = {"resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout}
    if c.init != "scratch":
        return _pretrained(c.init, "GPT2LMHeadModel", **drop)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        **drop,
    )
    return GPT2LMHeadModel(config)


def check_fits(cache: corpus.TokenCache, c: Config, world: int) -> None:
    """A window needs block_size + 1 tokens in the val split and in every rank's train slice."""
    need = c.block_size + 1
    shard = cache.train_tokens // world
    if shard >= need and cache.val_tokens >= need:
        return
    total = cache.train_tokens + cache.val_tokens
    most = min(shard, cache.val_tokens) - 1
    per = f" and each of {world} processes gets {shard:,} training tokens" if world > 1 else ""
    fix = f"Use --block-size {most} or less, or" if most >= 1 else "Use"
    raise JobError(
        f"--block-size {c.block_size} is longer than the corpus allows: a training window needs "
        f"{need:,} tokens, but the corpus has {total:,} tokens, its validation split "
        f"{cache.val_tokens:,}{per}. {fix} a larger corpus"
    )


def resolve_device(c: Config, d: dist.Dist):
    import torch

    return torch.device(pick_device(c.device, d.local_rank))


def autocast(c: Config, device):
    """bfloat16 autocast where asked (auto: a GPU that has it); float32 needs nothing."""
    import torch

    bf16 = c.dtype == "bfloat16" or (
        c.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class Pretraining:
    """One run's state: what the loop reads and what a checkpoint must carry."""

    c: Config
    d: dist.Dist
    run: rundir.RunDir | None  # None off rank 0: only rank 0 writes
    tok: Any  # None off rank 0: only rank 0 samples and saves
    model: Any  # DDP-wrapped under torchrun
    raw: Any  # the GPT2LMHeadModel itself
    optimizer: Any
    device: Any
    cache: corpus.TokenCache
    train: Windows
    val: Windows
    stop: StopSignal
    step: int = 0
    best_val: float = math.inf
    best_step: int | None = None  # the evaluation best_val came from
    last_val: float | None = None  # the latest evaluation's val loss

    def loop(self) -> int:
        """Train to max_steps (or a stop signal); returns the exit code."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        c = self.c
        ctx = autocast(c, self.device)
        if self.step == 0:
            self.evaluate(ctx, save=False)
        prefetch = Prefetcher(self._load, train_keys(self.step, c.max_steps, c.grad_accum))
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            unit="step",
            disable=not self.d.is_main,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
        )
        clock = _Clock(self.step, self.tokens_per_step)
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger("tinycloud")]):
                while self.step < c.max_steps:
                    lr = get_lr(self.step, c)
                    t0 = time.perf_counter()
                    loss, stop = self.train_step(prefetch, lr, ctx)
                    rate = self.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                    self.step += 1
                    # refresh=False: the bar redraws at its own pace (every 30 s into a log file)
                    bar.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False
                    )
                    bar.update(1)
                    if self.step % c.log_interval == 0 or self.step == c.max_steps or stop:
                        self.log_step(loss, lr, clock)
                    saved = False
                    if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                        self.evaluate(ctx, save=True)
                        saved = True
                    if stop:
                        self.interrupted(saved)
        finally:
            prefetch.close()
            bar.close()
        self.complete()
        return 0

    @property
    def tokens_per_step(self) -> int:
        c = self.c
        return c.batch_size * c.block_size * c.grad_accum * self.d.world_size

    def _load(self, step: int, micro: int):
        x, y = self.train.batch(step, micro)
        if self.device.type == "cuda":  # pinned, so the copy to the GPU can be asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def train_step(self, prefetch: Prefetcher, lr: float, ctx) -> tuple[float, bool]:
        """One optimizer step over grad_accum micro-batches; (mean loss over ranks, stop?)."""
        import torch
        import torch.nn.functional as F

        c = self.c
        for group in self.optimizer.param_groups:  # the schedule, applied by hand
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(c.grad_accum):
            x, y = prefetch.next((self.step, micro))
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # Under DDP, gradients are all-reduced on every backward unless told otherwise;
            # syncing only on the last micro-batch saves (grad_accum - 1) all-reduces a step.
            last = micro == c.grad_accum - 1
            sync = nullcontext() if last or not self.d.enabled else self.model.no_sync()
            with sync:
                with ctx:
                    logits = self.model(x).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / c.grad_accum).backward()
            total += loss.detach()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # One collective for both: the loss every rank agrees on, and whether any rank was
        # signalled (all ranks must stop at the same step, or the next all-reduce hangs).
        loss_sum, stops = dist.all_reduce_sum(
            [float(total) / c.grad_accum, float(self.stop.signum != 0)], self.d
        )
        return loss_sum / self.d.world_size, stops > 0

    def log_step(self, loss: float, lr: float, clock: _Clock) -> None:
        rate, eta = clock.tick(self.step, self.c.max_steps)
        if self.run is None:
            return
        c = self.c
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | %s tok/s | eta %s",
            self.step, c.max_steps, loss, lr, f"{rate:,.0f}", duration(eta),
        )  # fmt: skip
        self.run.append_metrics({"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": rate})
        progress = {RunKey.STEP: self.step, RunKey.MAX_STEPS: c.max_steps, RunKey.LOSS: loss}
        self.run.update(**progress, **{RunKey.TOKENS_PER_S: rate, RunKey.ETA_S: eta})

    def evaluate(self, ctx, *, save: bool) -> float:
        """Val loss over eval_iters fixed batches, a sample, and (when ``save``) ckpt.pt."""
        import torch
        import torch.nn.functional as F

        self.raw.eval()
        losses = []
        with torch.no_grad():
            for i in range(self.c.eval_iters):
                # The same batches at every evaluation, so the val curve moves only with the model.
                x, y = (t.to(self.device) for t in self.val.batch(i))
                with ctx:
                    logits = self.raw(x).logits
                losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
        val = dist.all_reduce_mean(sum(losses) / len(losses), self.d)
        self.last_val = val
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
            if self.c.keep == "best" and self.run is not None:
                rundir.atomic_torch_save(self.raw.state_dict(), self.run.path / BEST_WEIGHTS)
        text = self.sample() if self.d.is_main and self.c.sample_tokens else None
        self.raw.train()
        if self.run is not None:
            log.info("step %d: val loss %.4f (best %.4f)", self.step, val, self.best_val)
            if text is not None:
                log.info("sample: %s", text)
            row = {"step": self.step, "val_loss": val, "best_val_loss": self.best_val}
            self.run.append_metrics({**row, **({"sample": text} if text else {})})
            self.run.update(**{RunKey.VAL_LOSS: val, RunKey.BEST_VAL_LOSS: self.best_val})
        if save:
            self.save_checkpoint()
        return val

    def sample(self) -> str:
        """A short generation from sample_prompt, seeded by the step so it never disturbs the
        training RNG (a resumed run must draw exactly what the uninterrupted one drew)."""
        import torch

        eos = self.tok.eos_token_id
        ids = self.tok(self.c.sample_prompt, return_tensors="pt").input_ids
        n_pos = self.raw.config.n_positions
        ids = ids[:, -(n_pos - 1) :] if ids.shape[1] else torch.tensor([[eos]])
        new = min(self.c.sample_tokens, n_pos - ids.shape[1])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.c.seed + self.step)
            out = self.raw.generate(
                ids.to(self.device),
                attention_mask=torch.ones_like(ids).to(self.device),
                do_sample=True,
                top_k=self.c.sample_top_k,
                temperature=self.c.sample_temperature,
                max_new_tokens=new,
                pad_token_id=eos,
            )
        return self.tok.decode(out[0], skip_special_tokens=False)

    def checkpoint(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything a resume (or anything downstream) needs, nanoGPT style."""
        return {
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_args": self.raw.config.to_dict(),
            "step": self.step,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            "val_loss": self.last_val,
            "config": {k: _plain(v) for k, v in dataclasses.asdict(self.c).items()},
            "rng": rngs,  # one per rank
            "sampler": {"seed": self.c.seed, "next_step": self.step, "world_size": len(rngs)},
            "data": self.cache.as_dict(),
            "tokenizer_dir": TOKENIZER_DIR,
            "versions": {
                k: str(v) for k, v in rundir.versions().items()
            },  # plain str: weights_only
        }

    def save_checkpoint(self) -> None:
        rngs = dist.gather_objects(rng_state(), self.d)  # every rank takes part
        self.check_replicas()
        if self.run is not None:
            rundir.atomic_torch_save(self.checkpoint(rngs), self.run.checkpoint)
            log.info("step %d: saved %s", self.step, self.run.checkpoint)

    def check_replicas(self) -> None:
        """Under DDP every rank must hold the same weights; a checkpoint of one rank's copy is
        only the model if that holds, so check it (one float per rank) before writing."""
        if not self.d.enabled:
            return
        total = float(sum(p.detach().double().sum() for p in self.raw.parameters()))
        sums = dist.gather_objects(total, self.d)
        if len(set(sums)) != 1:
            raise RuntimeError(f"DDP replicas diverged at step {self.step}: {sums}")
        log.info("step %d: %d replicas in sync", self.step, len(sums))

    def interrupted(self, saved: bool) -> None:
        """Every rank saw the stop flag at this step: checkpoint, then end as interrupted."""
        if not saved:
            self.save_checkpoint()
        # A signal that reached only another rank stops this one too (as SIGTERM: torchrun's own).
        signum = self.stop.signum or signal.SIGTERM
        raise Interrupted(signum, **{RunKey.STEP: self.step, RunKey.BEST_VAL_LOSS: self.best_val})

    def complete(self) -> None:
        if self.run is None:
            return
        from transformers import GenerationConfig

        kept = self.keep_weights()
        eos = self.tok.eos_token_id
        self.raw.config.bos_token_id = self.raw.config.eos_token_id = eos
        self.raw.generation_config = GenerationConfig(
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos
        )
        self.tok.model_max_length = self.raw.config.n_positions
        with rundir.atomic_dir(self.run.model_dir) as tmp:  # a server never finds half a model
            self.raw.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
        self.run.plot_loss()
        self.run.finish(
            RunState.COMPLETED,
            **{
                RunKey.STEP: self.step,
                RunKey.MAX_STEPS: self.c.max_steps,
                RunKey.BEST_VAL_LOSS: self.best_val,
                RunKey.FINAL_VAL_LOSS: self.last_val,
                RunKey.KEPT_STEP: kept,
            },
        )
        self.run.write_manifest()
        log.info(
            "done: best val loss %.4f; model in %s (step %d's weights)",
            self.best_val, self.run.model_dir, kept,
        )  # fmt: skip

    def keep_weights(self) -> int:
        """With --keep best, put the best evaluation's weights back; the step they are from."""
        best = self.run.path / BEST_WEIGHTS if self.run is not None else None
        if self.c.keep != "best" or best is None or not best.is_file() or self.best_step is None:
            return self.step
        import torch

        self.raw.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
        log.info("--keep best: step %d's weights (val loss %.4f)", self.best_step, self.best_val)
        return self.best_step


class _Clock:
    """Tokens per second over the last log window, and an ETA from this session's pace."""

    def __init__(self, step: int, tokens_per_step: int):
        self.start = self.last = time.perf_counter()
        self.start_step = self.last_step = step
        self.tokens_per_step = tokens_per_step

    def tick(self, step: int, max_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tokens_per_step / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        per_step = (now - self.start) / max(step - self.start_step, 1)
        return rate, per_step * (max_steps - step)


# --- setting a run up ----------------------------------------------------------------------------


def prepare(c: Config, given: set[str], guard: Guard, stop: StopSignal) -> Pretraining:
    """Everything before the first step. Input errors surface before the run dir is touched."""
    d = guard.d
    c = dataclasses.replace(c, name=dist.broadcast_object(c.name or _default_name(), d))
    root = rundir.runs_root(c.runs_dir)
    ckpt = None
    if c.resume:
        if not (root / c.name / rundir.RUN_JSON).exists():
            raise JobError(f"--resume: no run {c.name!r} in {root} to continue. Drop --resume")
        ckpt = load_checkpoint(root / c.name / rundir.CHECKPOINT)
        c = resume_config(c, given, ckpt["config"])
    docs = read_corpus(c)  # on every rank, so a bad path fails everywhere, not just on rank 0
    saved_tok = root / c.name / TOKENIZER_DIR if ckpt else None
    tok, cache = dist.on_main(d, _tokenize, c, docs, saved_tok, root) or (None, None)
    cache = dist.broadcast_object(cache, d)
    if ckpt and cache.text_digest != ckpt["data"]["text_digest"]:
        raise JobError(
            "the corpus changed since the checkpoint was written, so --resume would not "
            "continue the same run. Restore the text, or start a new run with another --name"
        )
    check_fits(cache, c, d.world_size)
    device = resolve_device(c, d)
    run = guard.track(dist.on_main(d, _open_run, c, tok, cache, d.world_size))
    job = _build(c, d, device, run, tok, cache, ckpt, stop)
    _describe(job)
    return job


def _build(c: Config, d: dist.Dist, device, run, tok, cache, ckpt, stop) -> Pretraining:
    """The model, its optimizer and the data windows, fresh or from the checkpoint."""
    import torch

    torch.manual_seed(c.seed)  # the same initial weights on every rank
    model = build_model(c, cache.vocab_size, cache.eos_id, ckpt and ckpt["model_args"])
    if ckpt:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = configure_optimizer(model, c, device)
    torch.manual_seed(c.seed + d.rank)  # dropout masks differ between ranks
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        _restore_rng(ckpt, d, c)
    ddp = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
    common = {"block_size": c.block_size, "batch_size": c.batch_size, "seed": c.seed}
    train = Windows(cache.train_bin, cache.dtype, stream=TRAIN_STREAM, rank=d.rank,
                    world_size=d.world_size, **common)  # fmt: skip
    val = Windows(cache.val_bin, cache.dtype, stream=VAL_STREAM, rank=d.rank, shard=False, **common)
    job = Pretraining(c, d, run, tok, ddp, model, optimizer, device, cache, train, val, stop)
    if ckpt:
        job.step, job.best_val = int(ckpt["step"]), float(ckpt["best_val_loss"])
        job.best_step, job.last_val = ckpt.get("best_step"), ckpt.get("val_loss")
        if run is not None:
            run.truncate_metrics_after(job.step)
            log.info("resumed %s at step %d (best val loss %.4f)", c.name, job.step, job.best_val)
    return job


def _default_name() -> str:
    return time.strftime("pretrain-%Y%m%d-%H%M%S")


def _tokenize(c: Config, docs, saved_tok: Path | None, root: Path):
    """Rank 0: the tokenizer and the token files, which the other ranks then only read."""
    tok = get_tokenizer(c, docs, saved_tok)
    if c.init != "scratch" and not saved_tok:  # fail now, before a run dir exists
        n_positions = _pretrained(c.init, "GPT2Config").n_positions
        if c.block_size > n_positions:
            raise JobError(
                f"--block-size {c.block_size} is longer than the {n_positions} positions of "
                f"--init {c.init}. Use --block-size {n_positions} or less"
            )
    return tok, corpus.build_cache(docs, tok, root / CACHE_DIR)


def _open_run(c: Config, tok, cache: corpus.TokenCache, world_size: int) -> rundir.RunDir:
    args = {k: _plain(v) for k, v in dataclasses.asdict(c).items()}
    run = rundir.RunDir.create(
        c.runs_dir, c.name, job="pretrain", args=args, resume=c.resume, overwrite=c.overwrite
    )
    if not c.resume:
        tok.save_pretrained(run.path / TOKENIZER_DIR)
    for stale in run.path.glob(f".{rundir.CHECKPOINT}.*.tmp"):  # a write cut short by SIGKILL
        log.info("removing %s, left by a checkpoint write that was killed", stale.name)
        stale.unlink()
    trained = not tok.name_or_path  # a BPE built here has no name to load it by
    what = "a byte-level BPE trained on the corpus" if trained else repr(tok.name_or_path)
    run.log("tokenizer: %s, %d tokens; saved in %s/", what, len(tok), TOKENIZER_DIR)
    run.update(
        seed=c.seed,
        world_size=world_size,
        data=cache.as_dict(),
        tokenizer=what,
        **{RunKey.MAX_STEPS: c.max_steps, RunKey.TRAIN_TOKENS: cache.train_tokens},
    )
    return run


def _restore_rng(ckpt: dict[str, Any], d: dist.Dist, c: Config) -> None:
    rngs = ckpt["rng"]
    if len(rngs) == d.world_size:
        set_rng_state(rngs[d.rank])
        return
    import torch

    log.warning("checkpoint from %d processes, this run has %d: reseeding", len(rngs), d.world_size)
    torch.manual_seed(c.seed + d.rank + int(ckpt["step"]))


def _describe(job: Pretraining) -> None:
    if job.run is None:
        return
    c, cfg = job.c, job.raw.config
    n = sum(p.numel() for p in job.raw.parameters())
    log.info(
        "model: %d layers, %d heads, %d wide, %d positions, %d-token vocabulary: %.2fM params",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size, n / 1e6,
    )  # fmt: skip
    log.info(
        "data: %d train / %d val tokens; %d tokens a step (%d x %d x %d accum x %d processes)",
        job.cache.train_tokens, job.cache.val_tokens, job.tokens_per_step,
        c.batch_size, c.block_size, c.grad_accum, job.d.world_size,
    )  # fmt: skip
    log.info("device: %s; run dir: %s", job.device, job.run.path)


# --- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 a user error (one ``error:`` line), 143/130 stopped by SIGTERM/SIGINT
    with ckpt.pt to --resume from; see guard.py."""
    c, given = flags.parse(
        Config,
        argv,
        prog="python -m remote.jobs.pretrain",
        description=__doc__,
        check=check_config,
        recipes=RECIPES,
    )
    rundir.setup_logging()
    guard = Guard(dist.setup())
    if not guard.d.is_main:  # one voice in the console: rank 0's
        logging.getLogger("tinycloud").setLevel(logging.WARNING)

    def body() -> int:
        with StopSignal() as stop:
            return prepare(c, given, guard, stop).loop()

    return guard.main(body)


if __name__ == "__main__":
    sys.exit(main())
