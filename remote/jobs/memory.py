"""Will this fine-tune fit? An estimate made before any weight is loaded, and the machine's answer.

    est = estimate(shape_of(config), batch_size=4, seq_len=512, loss_tokens=1200)
    check(est, *available(device))   # raises MemoryEstimateError with numbers and remedies

The estimate adds, in bytes:

- weights: every parameter (fp32);
- gradients: one fp32 value per *trainable* parameter (LoRA trains under 1%);
- optimizer state: AdamW keeps two values per trainable parameter, SGD with momentum one,
  plain SGD none;
- activations kept for the backward pass: about 20 x n_embd values per token per layer (layer
  norms, q/k/v, attention output, the 4x MLP) plus the attention probabilities (n_head x length
  per token per layer) for one micro-batch of ``batch_size`` x ``seq_len`` tokens;
- logits: vocabulary-sized rows (and their gradient) only where the loss is taken;
- a fixed allowance for the framework itself.

It is meant to be a little pessimistic: a run it passes should not die of memory halfway.
No torch import at module level, so the control side can plan a run too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from remote.jobs.errors import JobError

GIB = 1024**3
ACT_VALUES_PER_TOKEN_LAYER = 20  # x n_embd values kept per token per layer for backward
LOGIT_COPIES = 3  # logits, their fp32 softmax, their gradient
FRAMEWORK_OVERHEAD = int(0.6 * GIB)  # torch + transformers + the data, resident before step 1
SAFETY = 1.10  # leave 10% headroom: allocator fragmentation, eval batches, checkpoint saving
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "sgd-momentum": 1, "nesterov": 1}
# Instances to suggest when a run cannot fit (memory in GiB): the project's default and up.
INSTANCES = (
    ("m5.large", 8),
    ("m5.xlarge", 16),
    ("m5.2xlarge", 32),
    ("m5.4xlarge", 64),
    ("g5.xlarge (24 GiB GPU)", 24),
)


class MemoryEstimateError(JobError):
    """The run would not fit; the message has the numbers and what to change."""


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int


def _first(config: Any, *names: str, default: int = 0) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    return default


def shape_of(config: Any) -> ModelShape:
    """The numbers the estimate needs, from a transformers config, without allocating weights.

    Parameters are counted exactly by building the model on the ``meta`` device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    return ModelShape(
        n_params=n_params,
        n_layer=_first(config, "n_layer", "num_layers", "num_hidden_layers"),
        n_embd=_first(config, "n_embd", "hidden_size", "d_model"),
        n_head=_first(config, "n_head", "num_heads", "num_attention_heads", default=1),
        vocab_size=_first(config, "vocab_size"),
        n_positions=_first(config, "n_positions", "max_position_embeddings", "n_ctx", default=1024),
    )


@dataclass(frozen=True)
class Estimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    trainable: int
    settings: dict[str, Any]

    @property
    def total(self) -> int:
        return int(
            (self.weights + self.gradients + self.optimizer + self.activations + self.logits)
            * SAFETY
            + self.overhead
        )

    def as_dict(self) -> dict[str, Any]:
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
        out = {k: round(getattr(self, k) / GIB, 3) for k in parts}
        return {**out, "total_gib": round(self.total / GIB, 3), "trainable": self.trainable}

    def breakdown(self) -> str:
        d = self.as_dict()
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
        return ", ".join(f"{k} {d[k]:.2f}" for k in parts) + " GiB, with 10% headroom"


def lora_params(shape: ModelShape, rank: int) -> int:
    """Trainable LoRA parameters on the fused q/k/v projection of every layer (peft's default
    for GPT-2): rank x (n_embd in + 3 n_embd out) per layer."""
    return shape.n_layer * rank * 4 * shape.n_embd


def estimate(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    loss_tokens: int | None = None,
    optimizer: str = "adamw",
    lora_rank: int = 0,
    activation_bytes: int = 4,
) -> Estimate:
    """Bytes one process needs to train ``shape`` on micro-batches of ``batch_size`` x ``seq_len``.

    ``loss_tokens``: positions of one micro-batch whose logits are computed (default: all).
    """
    trainable = lora_params(shape, lora_rank) if lora_rank > 0 else shape.n_params
    tokens = batch_size * seq_len
    per_token_layer = ACT_VALUES_PER_TOKEN_LAYER * shape.n_embd + 2 * shape.n_head * seq_len
    activations = tokens * shape.n_layer * per_token_layer * activation_bytes
    activations += tokens * shape.n_embd * 4 * activation_bytes  # embeddings and final norm
    positions = tokens if loss_tokens is None else min(loss_tokens, tokens)
    return Estimate(
        weights=shape.n_params * 4,
        gradients=trainable * 4,
        optimizer=trainable * 4 * OPTIMIZER_STATES[optimizer],
        activations=activations,
        logits=positions * shape.vocab_size * 4 * LOGIT_COPIES,
        overhead=FRAMEWORK_OVERHEAD,
        trainable=trainable,
        settings={
            "batch_size": batch_size,
            "seq_len": seq_len,
            "loss_tokens": positions,
            "optimizer": optimizer,
            "lora_rank": lora_rank,
            "activation_bytes": activation_bytes,
        },
    )


def available(device: str, *, limit_gib: float | None = None, procs: int = 1) -> tuple[int, str]:
    """(bytes this process may use, where that figure came from).

    CUDA: free memory on the current GPU. CPU: ``MemAvailable`` from /proc/meminfo (falling back
    to ``os.sysconf``), shared by the ``procs`` processes of a torchrun on this machine.
    ``limit_gib`` overrides both, to plan a run for a smaller machine than this one.
    """
    if limit_gib is not None:
        return int(limit_gib * GIB), f"--memory-limit-gb {limit_gib:g}"
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return free, "free GPU memory"
    return _cpu_available() // max(procs, 1), "available RAM" + (
        f" / {procs} processes" if procs > 1 else ""
    )


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def remedies(shape: ModelShape, est: Estimate, budget: int, grad_accum: int) -> list[str]:
    """Changes that would make the run fit, each with what it would then need."""
    s = est.settings
    base = {k: s[k] for k in ("optimizer", "lora_rank", "activation_bytes")}

    def need(**kw: Any) -> int:
        args = {"batch_size": s["batch_size"], "seq_len": s["seq_len"], **base, **kw}
        loss = s["loss_tokens"] * args["batch_size"] // max(s["batch_size"], 1)
        return estimate(shape, loss_tokens=loss, **args).total

    out = []
    for b in range(s["batch_size"] - 1, 0, -1):
        if (n := need(batch_size=b)) <= budget:
            accum = max(1, grad_accum * s["batch_size"] // b)
            out.append(f"--batch-size {b} --grad-accum {accum} (same examples per step; {_g(n)})")
            break
    for length in (512, 256, 128):
        if length < s["seq_len"] and (n := need(seq_len=length)) <= budget:
            out.append(f"--max-length {length} ({_g(n)})")
            break
    if not s["lora_rank"] and (n := need(lora_rank=8)) <= budget:
        out.append(f"--lora-rank 8 ({_g(n)})")
    if s["optimizer"] == "adamw" and (n := need(optimizer="sgd-momentum")) <= budget:
        out.append(f"--optimizer sgd-momentum ({_g(n)})")
    if not out and (n := need(batch_size=1, lora_rank=8, seq_len=min(256, s["seq_len"]))) <= budget:
        out.append(f"--batch-size 1 --lora-rank 8 --max-length 256 together ({_g(n)})")
    bigger = [name for name, gib in INSTANCES if gib * GIB * 0.9 >= est.total]
    if bigger:
        out.append(f"a bigger instance, e.g. {bigger[0]}")
    return out


def check(
    shape: ModelShape, est: Estimate, budget: int, source: str, *, grad_accum: int = 1
) -> None:
    """Raise MemoryEstimateError, with the numbers and what to change, if ``est`` exceeds
    ``budget``."""
    if est.total <= budget:
        return
    fixes = remedies(shape, est, budget, grad_accum)
    raise MemoryEstimateError(
        f"this run needs about {_g(est.total)} ({est.breakdown()}) but {source} is "
        f"{_g(budget)}. Try: " + ("; ".join(fixes) or "a much smaller model or batch")
    )


def _g(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def peak_bytes(device: str) -> int:
    """Peak memory this process used: the CUDA allocator's high-water mark, or the peak RSS."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
