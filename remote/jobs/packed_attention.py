"""Attention for packed rows on any device: each example attends only within itself, and no
row-by-row mask is ever applied.

    use_packed_attention(model)        # before LoRA; batches from sft_batches.FlattenBatch

Packing puts a micro-batch's examples end to end in one row with no padding, so no compute
goes to pad tokens. transformers then needs a block-diagonal causal mask; SDPA with an arbitrary
mask falls back to a slow kernel on a CPU (a packed 1,440-token row ran at half the speed of
padded micro-batches), and flash-attn's varlen kernel, which needs no mask, is CUDA-only. Here
SDPA's causal kernel runs once per example instead, from the example bounds FlattenBatch puts in
the batch as ``cu_seq_lens_q`` (the name flash-attn's varlen path reads, so flash_attention_2
takes the same batches unchanged). Anything without those bounds goes to transformers' SDPA as
before. A row from ``sft_batches.share_prefixes`` also carries ``segment_parents``: each segment
then attends to the shared segments above it as well (flash-attn knows nothing of that, so
finetune shares prefixes only for this attention).

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
    gqa = query.shape[1] != key.shape[1]
    from remote.jobs.sft_batches import PARENTS

    parents = kwargs.get(PARENTS)
    if parents is not None:
        parts = _tree_parts(query, key, value, bounds.tolist(), parents.tolist(), dropout,
                            scaling, gqa)  # fmt: skip
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None
    sizes = [b - a for a, b in pairwise(bounds.tolist()) if b > a]
    parts = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )
        for q, k, v in zip(*(x.split(sizes, dim=2) for x in (query, key, value)), strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _tree_parts(
    query: Any,
    key: Any,
    value: Any,
    bounds: list[int],
    parents: list[int],
    dropout: float,
    scaling: float | None,
    gqa: bool,
) -> list[Any]:
    """Attention of each segment of a ``sft_batches.share_prefixes`` row: its queries over the
    keys of the segments above it and its own, causal from its own first token on (the mask's
    diagonal is aligned to the bottom right, as the queries are the keys' last ones)."""
    import torch
    from torch.nn import functional as F

    from remote.jobs.sft_batches import segment_paths

    parts = []
    for path in segment_paths(bounds, parents):
        a, b = path[-1]
        q = query[:, :, a:b]
        if len(path) == 1:
            k, v, mask, causal = key[:, :, a:b], value[:, :, a:b], None, True
        else:
            k = torch.cat([key[:, :, x:y] for x, y in path], dim=2)
            v = torch.cat([value[:, :, x:y] for x, y in path], dim=2)
            n = k.shape[2]
            mask = torch.ones(b - a, n, dtype=torch.bool, device=q.device).tril(n - (b - a))
            causal = False
        parts.append(
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=causal,
                enable_gqa=gqa,
            )
        )
    return parts


def register() -> None:
    """Make ``NAME`` known to transformers (idempotent). The mask it is handed is SDPA's, so
    the fallback above gets the mask it expects."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` to per-example attention on packed rows, if it keeps packed examples
    apart that way; otherwise leave it as it was and return False (the caller pads instead).

    Some architectures ignore a custom attention function (transformers warns and keeps its
    own), and one that took it but never received the example bounds would let packed examples
    attend to each other. So the answer comes from the model itself: a short probe, two
    sequences alone and packed, must give the same logits.
    """
    register()
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    if model.config._attn_implementation == NAME and keeps_examples_apart(model):
        return True
    model.set_attn_implementation(before)
    return False


def keeps_examples_apart(model: Any, lengths: tuple[int, ...] = (3, 5)) -> bool:
    """Whether ``model`` gives each example in a packed row the logits it has alone."""
    import torch

    from remote.jobs.models import probing
    from remote.jobs.sft_batches import FlattenBatch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    packed = FlattenBatch()([{"input_ids": s, "labels": s} for s in seqs])
    packed.pop("labels")
    with probing(model):
        alone = [model(torch.tensor([s], device=device)).logits[0] for s in seqs]
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in packed.items()}
        together = model(**inputs).logits[0]
    return torch.allclose(torch.cat(alone), together, atol=1e-4, rtol=1e-3)


def follows_segment_tree(model: Any) -> bool:
    """Whether ``model`` attends as the rows of ``sft_batches.share_prefixes`` need: under this
    attention, which reads their tree (flash-attn or SDPA would not)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def can_share_prefixes(model: Any) -> bool:
    """Whether ``model`` may train on rows with shared prompt beginnings: it follows their tree
    and has no dropout, which would draw one mask for a shared prefix where each example had
    its own. (Evaluating needs only the first: no dropout runs then.)"""
    from torch import nn

    if not follows_segment_tree(model):
        return False
    return not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
