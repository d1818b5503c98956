"""LoRA adapters as peft saves them, read for ``GPT2Runner.add_adapter``.

A LoRA fine-tune (``fab train finetune --args "--lora-rank 16"``) keeps its adapter beside the
merged model: ``runs/<run>/model/adapter/`` holds peft's ``adapter_config.json`` and
``adapter_model.safetensors`` (a few MB for GPT-2 124M at rank 16). Served as an adapter, a run
costs that instead of a second copy of the base's weights, and decodes in the same batch as the
base and the other adapters, as TGI's multi-LoRA does.

    from serving.lora import find_adapter, read_config, read_deltas
    adapter_dir = find_adapter(Path("runs/lora-run/model"))      # .../model/adapter
    config = read_config(adapter_dir)                            # checked: what the server runs
    deltas = read_deltas(adapter_dir, config)                    # (layer, target) -> (A, B)

Only what the native decoder can add on the fly is taken: plain LoRA (``use_rslora`` too) on the
projections of GPT-2's blocks (``LORA_TARGETS``). An adapter that changes anything else (the
embedding, the LM head, biases, DoRA's magnitudes, ``modules_to_save``) is refused with the way
out: serve that run's merged model instead (``--model ID=DIR``).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facts import ADAPTER_DIR
from serving.model import LORA_TARGETS

CONFIG_FILE = "adapter_config.json"  # peft's names
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(
    r"(?:^|\.)transformer\.h\.(\d+)\.(" + "|".join(re.escape(t) for t in LORA_TARGETS) + r")"
    r"\.lora_([AB])\.weight$"
)
_REFUSED_OPTIONS = {  # peft options that change what a forward pass computes beyond (x@A)@B
    "use_dora": "DoRA",
    "alpha_pattern": "a per-module alpha (alpha_pattern)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


class AdapterError(ValueError):
    """An adapter this server cannot serve on the fly; the message says what to do instead."""


@dataclass(frozen=True)
class AdapterConfig:
    path: Path  # the adapter's directory
    base: str  # base_model_name_or_path as peft recorded it: a directory or a hub id
    rank: int
    alpha: float
    rslora: bool
    targets: tuple[str, ...]  # the LORA_TARGETS it changes, in their order
    tensors: dict[str, tuple[str, list[int]]]  # name -> (dtype, shape), from the file's header

    def scale(self, rank: int) -> float:
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())


def find_adapter(path: Path) -> Path | None:
    """The adapter directory a source names: ``path`` itself when it holds peft's files, or a
    model directory's ``adapter/`` (what finetune writes for a LoRA run); None when neither."""
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def merged_instead(adapter_dir: Path) -> str:
    """The way out for an adapter that cannot be served as one."""
    model = adapter_dir.parent if adapter_dir.name == ADAPTER_DIR else "runs/<run>/model"
    return f"serve the run's merged model instead (--model ID={model})"


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor names, dtypes and shapes of a safetensors file, from its header alone
    (8 bytes of length, then JSON): no weight is read, nothing imports torch."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100_000_000:
            raise AdapterError(f"{path} is not a safetensors file (header of {size} bytes)")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def read_config(adapter_dir: Path) -> AdapterConfig:
    """peft's adapter_config.json and the weight file's header, checked (no torch)."""
    where = adapter_dir / CONFIG_FILE
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {where}: {e}") from e
    out = merged_instead(adapter_dir)
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{where} is a {raw.get('peft_type')} adapter, not LoRA: {out}")
    for option, name in _REFUSED_OPTIONS.items():
        if raw.get(option):
            raise AdapterError(f"{where} uses {name}, which this server does not run: {out}")
    base = raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise AdapterError(f"{where} does not say which model it was trained on: {out}")
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir} has no {WEIGHTS_FILE}: {out}")
    header = safetensors_header(weights)
    targets = set()
    for name in header:
        match = _KEY.search(name)
        if match is None:
            raise AdapterError(f"the adapter in {adapter_dir} changes {name}: {out}")
        targets.add(match.group(2))
    tensors = {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}
    return AdapterConfig(
        path=adapter_dir,
        base=base,
        rank=int(raw.get("r") or 0),
        alpha=float(raw.get("lora_alpha") or 0),
        rslora=bool(raw.get("use_rslora")),
        targets=tuple(t for t in LORA_TARGETS if t in targets),
        tensors=tensors,
    )


def read_deltas(config: AdapterConfig) -> dict[tuple[int, str], tuple[Any, Any]]:
    """``(layer, target) -> (A, B)`` in fp32, oriented for ``(h @ A) @ B`` (A: in x r,
    B: r x out) and with the LoRA scale folded into B. peft adds ``B(A(h)) * scale`` to the
    projection's output; so does the runner."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(config.path / WEIGHTS_FILE))
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for name, tensor in tensors.items():
        match = _KEY.search(name)
        assert match is not None  # read_config refused anything else
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    deltas = {}
    for key, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"the adapter in {config.path} has half of layer {key}'s LoRA")
        a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)  # (r, in), (out, r)
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterError(f"the adapter in {config.path}: A and B disagree at {key}")
        deltas[key] = (a.t().contiguous(), (b * config.scale(rank)).t().contiguous())
    return deltas
