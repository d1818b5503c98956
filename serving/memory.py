"""The memory a serving plan needs, estimated from the models' configs and checked before any
weight is loaded, so a plan that cannot fit is refused at once with what would.

Per model (its own weights): parameters x bytes per parameter — fp32 4; ``--quantize int8`` 1
for the blocks' projections and for the LM head's int8 copy, 4 for the embeddings, norms and
biases — plus its KV cache, ``2 x layers x slots x context x width x 4`` bytes (each of the
``--max-batch-size`` slots can hold a whole context). Per LoRA adapter: its A and B in fp32 (it
shares its base's weights and KV cache). Plus the runtime: Python, torch, transformers and the
server, measured as the resident size of a server with a 2-layer model.

    from serving.memory import available, check
    budget, source = available("cpu")            # MemAvailable, or the cgroup's limit if lower
    check(needs, budget, source, slots=8, quantize=None)   # PlanRefused, saying what fits

Standard library only: the check runs before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 2**20
GIB = 2**30
# Resident size of `python -m serving.server` with a 2-layer, 64-wide model on CPU (torch,
# transformers, tokenizers, llguidance, uvicorn): 810 MB measured, 446 MB of it anonymous.
RUNTIME_BYTES = 800 * MIB
KV_BYTES = 4  # the cache is fp32 (int8 quantizes weights, not activations)


@dataclass(frozen=True)
class Shape:
    """A GPT-2 config's sizes: all the estimate needs."""

    n_layer: int
    n_embd: int
    n_positions: int
    vocab_size: int
    n_inner: int

    @property
    def projection_parameters(self) -> int:
        """The weights of the blocks' four projections (what int8 quantizes)."""
        e, i = self.n_embd, self.n_inner
        return self.n_layer * (e * 3 * e + e * e + e * i + i * e)

    @property
    def parameters(self) -> int:
        """GPT-2's parameter count (the LM head is tied to the token embedding)."""
        e, i = self.n_embd, self.n_inner
        per_layer = e * 3 * e + 3 * e + e * e + e + e * i + i + i * e + e + 4 * e  # + 2 norms
        return self.vocab_size * e + self.n_positions * e + self.n_layer * per_layer + 2 * e


def shape_of(config: dict[str, Any]) -> Shape:
    """The sizes of a GPT-2 ``config.json`` (as a dict)."""
    n_embd = int(config.get("n_embd") or 768)
    return Shape(
        n_layer=int(config.get("n_layer") or 12),
        n_embd=n_embd,
        n_positions=int(config.get("n_positions") or 1024),
        vocab_size=int(config.get("vocab_size") or 50257),
        n_inner=int(config.get("n_inner") or 4 * n_embd),
    )


def weight_bytes(shape: Shape, quantize: str | None) -> int:
    if quantize != "int8":
        return shape.parameters * 4
    projections = shape.projection_parameters
    head_copy = shape.vocab_size * shape.n_embd  # quantize_dynamic makes an int8 LM head
    return projections + (shape.parameters - projections) * 4 + head_copy


def kv_bytes(shape: Shape, slots: int) -> int:
    """Keys and values of every layer, and one layer's size of scratch for a batch's attention
    (model.GPT2Runner)."""
    return (2 * shape.n_layer + 1) * slots * shape.n_positions * shape.n_embd * KV_BYTES


@dataclass(frozen=True)
class Need:
    """What one entry of the plan takes: a model's weights and KV cache, or an adapter's A, B."""

    id: str
    what: str  # "model", "adapter over <base>", "base of <adapters> (not served by itself)"
    weights: int
    kv: int = 0
    kv_per_slot: int = 0
    listed: bool = True  # served under its id (False: a base loaded for its adapters only)

    @property
    def total(self) -> int:
        return self.weights + self.kv


class PlanRefused(ValueError):
    """The models asked for do not fit in memory; the message says what would."""


def available(device: str = "cpu", limit_gb: float | None = None) -> tuple[int, str]:
    """Bytes free for the server now, and where the figure comes from."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        budget, source = int(free), "free GPU memory"
    else:
        budget, source = _host_available()
    if limit_gb is not None and limit_gb * GIB < budget:
        return int(limit_gb * GIB), "--memory-limit-gb"
    return budget, source


def _host_available() -> tuple[int, str]:
    budget, source = 1 << 62, "no limit known"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                budget, source = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        if pages > 0:
            budget, source = pages * os.sysconf("SC_PAGE_SIZE"), "free physical memory"
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            if left < budget:
                budget, source = max(left, 0), "the cgroup's memory.max"
    except (OSError, ValueError):
        pass
    return budget, source


def mib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def describe(needs: list[Need], slots: int) -> list[str]:
    """One line per entry: what it is and what it takes."""
    width = max(len(n.id) for n in needs)
    lines = []
    for n in needs:
        size = mib(n.weights) + (" weights" if n.kv else "")
        if n.kv:
            size += f" + {mib(n.kv)} KV cache ({slots} slots)"
        lines.append(f"  {n.id:<{width}}  {size}  ({n.what})")
    return lines


def total(needs: list[Need]) -> int:
    return RUNTIME_BYTES + sum(n.total for n in needs)


def check(
    needs: list[Need],
    budget: int,
    source: str,
    *,
    slots: int,
    quantize: str | None,
    int8_needs: list[Need] | None = None,
) -> None:
    """Refuse (``PlanRefused``) a plan whose total is over ``budget``, saying what fits:
    the served ids a prefix of the plan can hold, the ``--max-batch-size`` that would hold all
    of it, and ``--quantize int8`` where that would. ``int8_needs``: the plan with int8."""
    need = total(needs)
    if need <= budget:
        return
    lines = [
        f"the models asked for need {mib(need)} of memory and {mib(budget)} is available "
        f"({source}):",
        *describe(needs, slots),
        f"  {'runtime':<{max(len(n.id) for n in needs)}}  {mib(RUNTIME_BYTES)}  "
        "(Python, torch, the server)",
        "What fits: " + "; ".join(_what_fits(needs, budget, slots, quantize, int8_needs)) + ".",
    ]
    raise PlanRefused("\n".join(lines))


def _what_fits(
    needs: list[Need],
    budget: int,
    slots: int,
    quantize: str | None,
    int8_needs: list[Need] | None,
) -> list[str]:
    options = []
    fitting: list[Need] = []
    for n in needs:
        if total([*fitting, n]) > budget:
            break
        fitting.append(n)
    served = [n.id for n in fitting if n.listed]
    if served:
        options.append(f"{_listing(served)} ({mib(total(fitting))})")
    else:
        options.append("not even the first model as asked")
    per_slot = sum(n.kv_per_slot for n in needs)
    fixed = RUNTIME_BYTES + sum(n.weights for n in needs)
    if per_slot and budget > fixed:
        fewer = min((budget - fixed) // per_slot, slots - 1)
        if fewer >= 1:
            options.append(f"all of them with --max-batch-size {fewer}")
    if quantize is None and int8_needs is not None and total(int8_needs) <= budget:
        options.append(f"all of them with --quantize int8 ({mib(total(int8_needs))})")
    return options


def _listing(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else ", ".join(ids[:-1]) + " and " + ids[-1]
