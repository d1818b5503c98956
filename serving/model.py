"""Load a GPT-2 directory and run it with a slot KV cache, fast enough for a 2-core CPU.

Why not ``model.generate``: it decodes one request at a time and pays Hugging Face's generic
per-step bookkeeping. Here the weights of the loaded ``GPT2LMHeadModel`` are driven by a
short forward pass written out below, against a preallocated cache of ``slots`` sequences:

- ``prefill(slot, ids)`` runs a prompt and fills that slot's keys/values;
- ``decode(tokens, positions)`` advances slots ``0..B-1`` by one token each, together, so eight
  concurrent requests cost about one weight read per step instead of eight;
- ``move(src, dst, length)`` keeps the live slots packed at the front (continuous batching: a
  request joins or leaves between any two steps).

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


@dataclass
class LoadedModel:
    """Everything the engine and /info need about the model being served."""

    runner: Any  # GPT2Runner
    tokenizer: Any
    model_id: str
    dtype: str  # what /info reports as model_dtype
    device: str
    max_total_tokens: int
    max_input_tokens: int
    eos_token_ids: frozenset[int]
    quantize: str | None
    prompt_format: dict[str, Any] | None

    def describe(self) -> str:
        return (
            f"{self.model_id}: dtype {self.dtype}, device {self.device}, "
            f"context {self.max_total_tokens}, eos {sorted(self.eos_token_ids)}"
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
    )


def _eos_ids(hf: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(hf, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
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
        self.wte, self.wpe, self.ln_f, self.lm_head = tr.wte, tr.wpe, tr.ln_f, hf.lm_head
        self.blocks = list(tr.h)
        base = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        by_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))
        self.scales = [base / (i + 1) if by_layer else base for i in range(len(self.blocks))]
        self.act = _activation(cfg.activation_function)
        device = tr.wte.weight.device
        shape = (len(self.blocks), slots, self.n_head, max_len, self.head_dim)
        # zeros, not empty: padded positions are masked, but 0 * NaN garbage would still be NaN
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.arange = torch.arange(max_len, device=device)
        self.device = device

    # -- the three operations the engine uses ---------------------------------------------------

    def prefill(self, slot: int, ids: list[int], *, all_logits: bool = False) -> Any:
        """Run a prompt in ``slot``; logits of the last position (or of every position)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            t = len(ids)
            idx = torch.tensor(ids, device=self.device)
            x = self.wte(idx) + self.wpe(self.arange[:t])  # (T, E)
            for layer, blk in enumerate(self.blocks):
                q, k, v = self._qkv(blk, x, t)  # (T, H, D) each
                k, v = k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
                self.k[layer, slot, :, :t] = k
                self.v[layer, slot, :, :t] = v
                a = F.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0),
                    k.unsqueeze(0),
                    v.unsqueeze(0),
                    is_causal=True,
                    scale=self.scales[layer],
                )  # (1, H, T, D)
                x = self._finish_block(blk, x, a.squeeze(0).transpose(0, 1).reshape(t, -1))
            x = x if all_logits else x[-1:]
            return self.lm_head(self.ln_f(x)).float()

    def decode(self, tokens: Any, positions: Any) -> Any:
        """Advance slots ``0..B-1`` by one token each: ``tokens[b]`` sits at ``positions[b]``."""
        import torch

        with torch.inference_mode():
            b = tokens.shape[0]
            low, high = (int(p) for p in positions.aminmax())
            span = high + 1
            if low == high:  # every sequence at the same position (one stream): no padding
                mask, where = None, (slice(0, b), slice(None), high)
            else:  # an additive mask over (B*H, 1, span), built once per step, not per layer
                keep = self.arange[:span].unsqueeze(0) <= positions.unsqueeze(1)  # (B, span)
                mask = torch.zeros((b, self.n_head, 1, span), device=self.device)
                mask.masked_fill_(~keep[:, None, None, :], float("-inf"))
                mask = mask.view(b * self.n_head, 1, span)
                where = (self.arange[:b], slice(None), positions)
            x = self.wte(tokens) + self.wpe(positions)  # (B, E)
            for layer, blk in enumerate(self.blocks):
                q, k, v = self._qkv(blk, x, b)  # (B, H, D)
                ck, cv = self.k[layer], self.v[layer]
                ck[where] = k
                cv[where] = v
                a = self._attend(layer, q, span, mask)
                x = self._finish_block(blk, x, a.reshape(b, -1))
            return self.lm_head(self.ln_f(x)).float()

    def _attend(self, layer: int, q: Any, span: int, mask: Any) -> Any:
        """One query per sequence (``q``: (B, H, D)) over the first ``span`` cache positions."""
        import torch
        import torch.nn.functional as F

        b = q.shape[0]
        ck, cv = self.k[layer, :b, :, :span], self.v[layer, :b, :, :span]
        if b == 1:  # one stream: SDPA's kernel is the fastest here
            return F.scaled_dot_product_attention(q.unsqueeze(2), ck, cv, scale=self.scales[layer])
        # a batch: two batched matmuls over cache views (no copies) beat SDPA's flash kernel,
        # which tiles for long queries (it took 28% of a step at 8 streams)
        bh = b * self.n_head
        keys = ck.reshape(bh, span, self.head_dim).transpose(1, 2)
        q1 = q.reshape(bh, 1, self.head_dim)
        if mask is None:
            scores = torch.bmm(q1, keys).mul_(self.scales[layer])
        else:
            scores = torch.baddbmm(mask, q1, keys, alpha=self.scales[layer])
        return torch.bmm(torch.softmax(scores, dim=-1), cv.reshape(bh, span, self.head_dim))

    def clear(self, slot: int) -> None:
        """Zero a slot whose sequence failed: a NaN left behind would reach the next sequence
        there through masked attention (0 * NaN is NaN)."""
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache from one slot to another (to keep live slots packed)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    # -- pieces ------------------------------------------------------------------------------------

    def _qkv(self, blk: Any, x: Any, n: int) -> tuple[Any, Any, Any]:
        qkv = blk.attn.c_attn(blk.ln_1(x)).view(n, 3, self.n_head, self.head_dim)
        return qkv.unbind(1)

    def _finish_block(self, blk: Any, x: Any, attn: Any) -> Any:
        x = x + blk.attn.c_proj(attn)
        return x + blk.mlp.c_proj(self.act(blk.mlp.c_fc(blk.ln_2(x))))


def _activation(name: str) -> Any:
    import torch.nn.functional as F

    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    from transformers.activations import ACT2FN

    return ACT2FN[name]
