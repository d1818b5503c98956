"""Attention for packed rows on any device: each example attends only within itself, and no
row-by-row mask is ever applied.

    use_packed_attention(model)        # before LoRA; batches from batching.FlattenBatch

Packing puts a micro-batch's examples end to end in one row with no padding, so no compute
goes to pad tokens. transformers then needs a block-diagonal causal mask; SDPA with an arbitrary
mask falls back to a slow kernel on a CPU (a packed 1,440-token row ran at half the speed of
padded micro-batches), and flash-attn's varlen kernel, which needs no mask, is CUDA-only. Here
SDPA's causal kernel runs once per example instead, from the example bounds FlattenBatch puts in
the batch as ``cu_seq_lens_q`` (the name flash-attn's varlen path reads, so flash_attention_2
takes the same batches unchanged). Anything without those bounds goes to transformers' SDPA as
before.

Registered under its own name, which only lives in the loaded model: saved configs do not
record the attention implementation, so a saved model loads anywhere as a plain one.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

NAME = "tinycloud_packed_sdpa"


def packed_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature: query/key/value are (batch, heads, time,
    head_dim); returns (batch, time, heads, head_dim) like its SDPA function."""
    import torch
    from torch.nn import functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cuts = bounds.tolist()
    gqa = query.shape[1] != key.shape[1]
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=gqa,
        )
        for a, b in pairwise(cuts)
        if b > a
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``NAME`` known to transformers (idempotent). The mask it is handed is SDPA's, so
    the fallback above gets the mask it expects."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` to per-example attention on packed rows; False (model unchanged) for an
    architecture that cannot take a custom attention function."""
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True
