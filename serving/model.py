"""Load a GPT-2 directory and run it with a slot KV cache, fast enough for a 2-core CPU.

Why not ``model.generate``: it decodes one request at a time and pays Hugging Face's generic
per-step bookkeeping. Here the weights of the loaded ``GPT2LMHeadModel`` are driven by a
short forward pass written out below, against a preallocated cache of ``slots`` sequences:

- ``prefill(slot, ids)`` runs a prompt and fills that slot's keys/values;
- ``decode(tokens, positions)`` advances slots ``0..B-1`` by one token each, together, so eight
  concurrent requests cost about one weight read per step instead of eight;
- ``move(src, dst, length)`` keeps the live slots packed at the front (continuous batching: a
  request joins or leaves between any two steps).

LoRA adapters (``add_adapter``) ride on the same weights, as TGI's multi-LoRA does: each sequence
names its adapter (0: none), and a projection an adapter changes gets ``(x @ A) @ B`` added for
that adapter's rows only, so sequences of the base and of several adapters decode in one batch
and the base's weights are read once per step. A batch with no adapter in it runs the plain
path, unchanged.

``--quantize int8``: GPT-2's projections are ``transformers`` ``Conv1D`` modules, which
``torch.ao.quantization.quantize_dynamic`` skips, so they become ``nn.Linear`` first; then every
Linear (the LM head too) gets int8 weights. On a memory-bound CPU that is most of the win.

    python -c "from serving.model import load_model; print(load_model('runs/x/model').describe())"
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facts import PROMPT_FORMAT_FILE
from serving import constants as C
from serving import memory

# The projections of a GPT-2 block a LoRA adapter may change (peft's names under
# ``transformer.h.<layer>``): c_attn by default, all four with ``target_modules="all-linear"``.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class LoadedModel:
    """Everything the engine and /info need about one served model (or adapter)."""

    runner: Any  # GPT2Runner; an adapter shares its base's
    tokenizer: Any
    model_id: str
    dtype: str  # what /info reports as model_dtype
    device: str
    max_total_tokens: int
    max_input_tokens: int
    eos_token_ids: frozenset[int]
    quantize: str | None
    prompt_format: dict[str, Any] | None
    adapter: int = 0  # the runner's LoRA adapter this id decodes with (0: the weights alone)
    base_id: str | None = None  # an adapter's base: the id (or source) of the model beneath it
    memory_bytes: int = 0  # what this id added: weights (+ KV cache), or the adapter's A and B
    kind: str = "model"  # "model" (its own weights) or "adapter" (LoRA over base_id)

    def describe(self) -> str:
        over = f", LoRA over {self.base_id}" if self.kind == "adapter" else ""
        return (
            f"{self.model_id}: dtype {self.dtype}, device {self.device}, "
            f"context {self.max_total_tokens}, eos {sorted(self.eos_token_ids)}{over}"
        )


def default_model_id(path: Path, given: str) -> str:
    """What /info calls the model: a run's ``runs/<run>/model`` is known by the run's name."""
    if not path.exists():
        return given  # a hub id
    resolved = path.resolve()
    return resolved.parent.name if resolved.name == "model" else resolved.name


def conv1d_to_linear(conv: Any) -> Any:
    """A ``transformers`` ``Conv1D`` (y = x @ W + b, W stored in x out) as an ``nn.Linear``."""
    import torch
    from torch import nn

    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def linearize(model: Any) -> Any:
    """Swap every ``Conv1D`` in ``model`` for the equivalent ``nn.Linear``, in place."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, name, conv1d_to_linear(child))
    return model


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 for every Linear: weights stored int8, activations quantized per call."""
    import warnings

    import torch
    from torch import nn

    linearize(model)
    # The LM head shares its weight with the token embedding; the quantized copy is separate,
    # and the embedding lookup keeps the float table. torch marks eager quantization as moving
    # to torchao, but it is what ships with torch today and it works; keep the logs clean.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def read_prompt_format(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / PROMPT_FORMAT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Re-save the model directory.") from e
    return data if isinstance(data, dict) else None


def load_model(
    model: str,
    *,
    quantize: str | None = None,
    device: str = "cpu",
    slots: int = C.MAX_BATCH_SIZE,
    model_id: str | None = None,
) -> LoadedModel:
    """Load a ``save_pretrained`` directory (or hub id) and wrap it for serving."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if not path.exists() and model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {model} does not exist. Pass --model DIR.")
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.eval()
    cfg = hf.config
    if cfg.model_type != "gpt2":
        raise ValueError(
            f"the native server runs GPT-2 models; {model} is {cfg.model_type!r}. "
            "Serve it with TGI (launch_gpt2.sh) instead."
        )
    dtype = "torch.float32"
    if quantize == "int8":
        hf = quantize_int8(hf)
        dtype = "torch.qint8"
    hf.to(device)
    n_ctx = int(cfg.n_positions)
    eos = _eos_ids(hf, tokenizer)
    shape = memory.shape_of(cfg.to_dict())
    planned = memory.weight_bytes(shape, quantize) + memory.kv_bytes(shape, slots)
    return LoadedModel(
        runner=GPT2Runner(hf, slots=slots, max_len=n_ctx),
        tokenizer=tokenizer,
        model_id=model_id or default_model_id(path, model),
        dtype=dtype,
        device=device,
        max_total_tokens=n_ctx,
        max_input_tokens=n_ctx - 1,
        eos_token_ids=eos,
        quantize=quantize,
        prompt_format=read_prompt_format(path) if path.is_dir() else None,
        memory_bytes=planned,
    )


def _eos_ids(hf: Any, tokenizer: Any) -> frozenset[int]:
    gen = getattr(hf, "generation_config", None)
    return _ids(getattr(gen, "eos_token_id", None), tokenizer.eos_token_id)


def eos_ids_of(model_dir: Path, tokenizer: Any) -> frozenset[int]:
    """The EOS ids a directory's generation_config.json and tokenizer name (for an adapter's
    run, which has no weights of its own to load a generation config with)."""
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        gen = {}
    return _ids(gen.get("eos_token_id") if isinstance(gen, dict) else None, tokenizer.eos_token_id)


def _ids(*values: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class GPT2Runner:
    """GPT-2's forward pass over a slot KV cache. Not thread-safe: the engine's scheduler
    thread is its only caller."""

    def __init__(self, hf: Any, *, slots: int, max_len: int) -> None:
        import torch

        cfg = hf.config
        tr = hf.transformer
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.n_embd = cfg.n_embd
        self.vocab_size = cfg.vocab_size
        self.slots = slots
        self.max_len = max_len
        self.wte, self.wpe = tr.wte, tr.wpe
        self.blocks = list(tr.h)
        # each step calls the weights' kernels directly (see direct_op)
        self.ops = [BlockOps.of(blk) for blk in self.blocks]
        self.final_norm, self.head = direct_op(tr.ln_f), direct_op(hf.lm_head)
        base = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        by_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))
        self.scales = [base / (i + 1) if by_layer else base for i in range(len(self.blocks))]
        self.act = _activation(cfg.activation_function)
        device = tr.wte.weight.device
        # Slot-major: a slot's positions 0..t are one contiguous block of t x heads x head_dim,
        # so a batch's attention streams through memory (head-major, it read 96 short runs a
        # layer at 8 streams, at a quarter of the memory bandwidth).
        shape = (len(self.blocks), slots, max_len, self.n_head, self.head_dim)
        # zeros, not empty: padded positions are masked, but 0 * NaN garbage would still be NaN
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        # a batch's attention writes its products here: no fresh allocation (and page faults)
        # of a megabytes-large temporary per layer and step
        self.scratch = torch.empty(shape[1:], device=device)
        self.arange = torch.arange(max_len, device=device)
        self.device = device
        # LoRA adapters: per adapter, (layer, target) -> (A (in, r), B (r, out), scale folded in)
        self.adapters: list[dict[tuple[int, str], tuple[Any, Any]]] = [{}]  # 0: no adapter

    def add_adapter(self, deltas: dict[tuple[int, str], tuple[Any, Any]]) -> int:
        """Add a LoRA adapter (``lora.read_adapter``'s deltas); the index sequences name it by."""
        for (layer, target), (a, b) in deltas.items():
            module = self.blocks[layer].get_submodule(target)
            n_in, n_out = _in_out(module)
            if a.shape[0] != n_in or b.shape[1] != n_out:
                raise ValueError(
                    f"the adapter's layer {layer} {target} maps {a.shape[0]} -> {b.shape[1]} "
                    f"features; this model's maps {n_in} -> {n_out}: it was trained on another "
                    "base model"
                )
        on_device = {k: (a.to(self.device), b.to(self.device)) for k, (a, b) in deltas.items()}
        self.adapters.append(on_device)
        return len(self.adapters) - 1

    # -- the three operations the engine uses ---------------------------------------------------

    def prefill(
        self, slot: int, ids: list[int], *, all_logits: bool = False, adapter: int = 0
    ) -> Any:
        """Run a prompt in ``slot`` (with LoRA ``adapter``, 0 for none); logits of the last
        position (or of every position)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            t = len(ids)
            idx = torch.tensor(ids, device=self.device)
            lora = [(self.adapters[adapter], None)] if adapter else None
            x = self.wte(idx) + self.wpe(self.arange[:t])  # (T, E)
            for layer in range(len(self.blocks)):
                if lora is None:
                    q, k, v = self._qkv(layer, x, t)  # (T, H, D) each
                else:
                    q, k, v = self._qkv_lora(layer, x, t, lora)
                self.k[layer, slot, :t] = k
                self.v[layer, slot, :t] = v
                k, v = k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
                a = F.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0),
                    k.unsqueeze(0),
                    v.unsqueeze(0),
                    is_causal=True,
                    scale=self.scales[layer],
                )  # (1, H, T, D)
                a = a.squeeze(0).transpose(0, 1).reshape(t, -1)
                if lora is None:
                    x = self._finish_block(layer, x, a)
                else:
                    x = self._finish_block_lora(layer, x, a, lora)
            x = x if all_logits else x[-1:]
            return self.head(self.final_norm(x)).float()

    def decode(self, tokens: Any, positions: Any, adapters: list[int] | None = None) -> Any:
        """Advance slots ``0..B-1`` by one token each: ``tokens[b]`` sits at ``positions[b]``
        and decodes with LoRA adapter ``adapters[b]`` (None: no adapter in the batch)."""
        import torch

        with torch.inference_mode():
            b = tokens.shape[0]
            low, high = (int(p) for p in positions.aminmax())
            span = high + 1
            if low == high:  # every sequence at the same position (one stream): no padding
                mask, rows = None, None
            else:  # an additive mask over (B, span, 1), built once per step, not per layer
                keep = self.arange[:span].unsqueeze(0) <= positions.unsqueeze(1)  # (B, span)
                mask = torch.zeros((b, span, 1), device=self.device)
                mask.masked_fill_(~keep.unsqueeze(-1), float("-inf"))
                rows = self.arange[:b] * self.max_len + positions  # into a layer's (S*T, H, D)
            lora = self._lora_rows(adapters) if adapters else None
            x = self.wte(tokens) + self.wpe(positions)  # (B, E)
            for layer in range(len(self.blocks)):
                if lora is None:
                    q, k, v = self._qkv(layer, x, b)  # (B, H, D)
                else:
                    q, k, v = self._qkv_lora(layer, x, b, lora)
                if rows is None:
                    self.k[layer, :b, high] = k
                    self.v[layer, :b, high] = v
                else:
                    flat = (self.slots * self.max_len, self.n_head, self.head_dim)
                    self.k[layer].view(flat).index_copy_(0, rows, k)
                    self.v[layer].view(flat).index_copy_(0, rows, v)
                a = self._attend(layer, q, span, mask)
                if lora is None:
                    x = self._finish_block(layer, x, a.reshape(b, -1))
                else:
                    x = self._finish_block_lora(layer, x, a.reshape(b, -1), lora)
            return self.head(self.final_norm(x)).float()

    def _attend(self, layer: int, q: Any, span: int, mask: Any) -> Any:
        """One query per sequence (``q``: (B, H, D)) over the first ``span`` cache positions;
        ``mask`` (B, span, 1) is added to the scores (None: every position counts)."""
        import torch
        import torch.nn.functional as F

        b = q.shape[0]
        ck, cv = self.k[layer, :b, :span], self.v[layer, :b, :span]  # (B, span, H, D)
        if b == 1:  # one stream: SDPA's kernel is the fastest here
            return F.scaled_dot_product_attention(
                q.unsqueeze(2), ck.transpose(1, 2), cv.transpose(1, 2), scale=self.scales[layer]
            )
        # a batch: products and sums through one scratch block, reading the cache once in
        # order; batched matmuls (or SDPA) over many one-row queries ran at a third the speed
        tmp = self.scratch[:b, :span]
        scores = torch.mul(ck, q.unsqueeze(1), out=tmp).sum(-1).mul_(self.scales[layer])
        if mask is not None:
            scores.add_(mask)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)  # (B, span, H, 1)
        return torch.mul(cv, weights, out=tmp).sum(1)  # (B, H, D)

    def clear(self, slot: int) -> None:
        """Zero a slot whose sequence failed: a NaN left behind would reach the next sequence
        there through masked attention (0 * NaN is NaN)."""
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache from one slot to another (to keep live slots packed)."""
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]

    # -- pieces ------------------------------------------------------------------------------------

    def _qkv(self, layer: int, x: Any, n: int) -> tuple[Any, Any, Any]:
        op = self.ops[layer]
        qkv = op.c_attn(op.ln_1(x)).view(n, 3, self.n_head, self.head_dim)
        return qkv.unbind(1)

    def _finish_block(self, layer: int, x: Any, attn: Any) -> Any:
        op = self.ops[layer]
        x = x + op.attn_proj(attn)
        return x + op.mlp_proj(self.act(op.c_fc(op.ln_2(x))))

    # -- the same with LoRA adapters --------------------------------------------------------------

    def _lora_rows(self, adapters: list[int]) -> Lora | None:
        """Which rows of the batch each adapter in it decodes (None: no adapter at all)."""
        import torch

        used = sorted(set(adapters) - {0})
        if not used:
            return None
        if len(used) == 1 and len(adapters) == adapters.count(used[0]):
            return [(self.adapters[used[0]], None)]  # every row: no gather, no scatter
        return [
            (
                self.adapters[i],
                torch.tensor([r for r, a in enumerate(adapters) if a == i], device=self.device),
            )
            for i in used
        ]

    def _qkv_lora(self, layer: int, x: Any, n: int, lora: Lora) -> tuple[Any, Any, Any]:
        op = self.ops[layer]
        h = op.ln_1(x)
        y = _plus_lora(op.c_attn(h), h, layer, "attn.c_attn", lora)
        return y.view(n, 3, self.n_head, self.head_dim).unbind(1)

    def _finish_block_lora(self, layer: int, x: Any, attn: Any, lora: Lora) -> Any:
        op = self.ops[layer]
        x = x + _plus_lora(op.attn_proj(attn), attn, layer, "attn.c_proj", lora)
        h = op.ln_2(x)
        u = self.act(_plus_lora(op.c_fc(h), h, layer, "mlp.c_fc", lora))
        return x + _plus_lora(op.mlp_proj(u), u, layer, "mlp.c_proj", lora)


# Per adapter in a batch: its deltas, and the rows it decodes (None: every row).
Lora = list[tuple[dict[tuple[int, str], tuple[Any, Any]], Any]]


@dataclass
class BlockOps:
    """A block's layer norms and projections as direct kernel calls (``direct_op``); attributes,
    so a profiler can wrap each one (bench/serve_profile.py)."""

    ln_1: Any
    c_attn: Any
    attn_proj: Any
    ln_2: Any
    c_fc: Any
    mlp_proj: Any

    @classmethod
    def of(cls, blk: Any) -> BlockOps:
        attn, mlp = blk.attn, blk.mlp
        return cls(
            ln_1=direct_op(blk.ln_1),
            c_attn=direct_op(attn.c_attn),
            attn_proj=direct_op(attn.c_proj),
            ln_2=direct_op(blk.ln_2),
            c_fc=direct_op(mlp.c_fc),
            mlp_proj=direct_op(mlp.c_proj),
        )


def direct_op(module: Any) -> Any:
    """``module``'s forward for a 2-D input as one call to its kernel, without
    ``nn.Module.__call__`` and the layer's own checks: ~100 such calls make a decode step, and
    skipping that machinery took a step from 12.2 to 11.0 ms (one stream) and 18.7 to 16.8 ms
    (eight), int8, in-process. The same kernel and arguments the module's forward uses; any
    other module is called as it is."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    packed = getattr(module, "_packed_params", None)
    if packed is not None and getattr(packed, "dtype", None) == torch.qint8:
        params, op = packed._packed_params, torch.ops.quantized.linear_dynamic
        if module.version is None or module.version < 4:
            return lambda x: op(x, params)
        return lambda x: op(x, params, reduce_range=True)  # as its forward (version 4+)
    if type(module) is nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if type(module) is Conv1D and module.bias is not None:
        weight, bias = module.weight, module.bias
        return lambda x: torch.addmm(bias, x, weight)
    return module


def _plus_lora(y: Any, h: Any, layer: int, target: str, lora: Lora) -> Any:
    """``y`` (a projection of ``h``) plus each adapter's ``(h @ A) @ B`` on its own rows."""
    for deltas, rows in lora:
        ab = deltas.get((layer, target))
        if ab is None:
            continue
        a, b = ab
        if rows is None:  # every row has this adapter
            y = y + (h @ a) @ b
            continue
        y = y.index_add(0, rows, (h.index_select(0, rows) @ a) @ b)
    return y


def _in_out(module: Any) -> tuple[int, int]:
    """Input and output features of a projection: a ``Conv1D`` (weight in x out), an
    ``nn.Linear`` (out x in) or a dynamically quantized Linear."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    n_in, n_out = module.weight.shape
    return int(n_in), int(n_out)


def _activation(name: str) -> Any:
    import torch.nn.functional as F

    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    from transformers.activations import ACT2FN

    return ACT2FN[name]
