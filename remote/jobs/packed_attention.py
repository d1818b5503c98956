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

On a CPU without dropout the segments go through one autograd function that calls SDPA's flash
kernel and its backward itself (``_segment_attention``): the same numbers, without the zeroed
full-row gradient autograd makes for every slice. Elsewhere (a GPU, dropout, grouped keys) SDPA
runs on slices and autograd does the rest.

Registered under its own name, which only lives in the loaded model: saved configs do not
record the attention implementation, so a saved model loads anywhere as a plain one.
"""

from __future__ import annotations

from functools import cache
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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from remote.jobs.sft_batches import PARENTS, segment_paths

    parents, cuts = kwargs.get(PARENTS), bounds.tolist()
    paths = segment_paths(cuts, None if parents is None else parents.tolist())
    paths = [p for p in paths if p[-1][1] > p[-1][0]]
    gqa = query.shape[1] != key.shape[1]
    whole = cuts[0] == 0 and cuts[-1] == query.shape[2]  # every position in a segment
    if query.device.type == "cpu" and dropout == 0.0 and not gqa and whole and _cpu_kernels():
        return _segment_attention().apply(query, key, value, paths, scaling), None
    return _autograd_attention(
        query, key, value, paths, parents is not None, dropout, scaling
    ), None


def _autograd_attention(
    query: Any,
    key: Any,
    value: Any,
    paths: list[list[tuple[int, int]]],
    tree: bool,
    dropout: float,
    scaling: float | None,
) -> Any:
    """The same attention on any device, with dropout or grouped keys: SDPA per segment on
    slices, autograd doing the rest."""
    import torch
    from torch.nn import functional as F

    gqa = query.shape[1] != key.shape[1]
    if not tree:  # one split, whose backward is one concatenation
        sizes = [p[0][1] - p[0][0] for p in paths]
        qkv = zip(*(x.split(sizes, dim=2) for x in (query, key, value)), strict=True)
        parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                is_causal=True, enable_gqa=gqa)
                 for q, k, v in qkv]  # fmt: skip
    else:
        parts = [
            F.scaled_dot_product_attention(
                query[:, :, p[-1][0] : p[-1][1]],
                _keys(key, p),
                _keys(value, p),
                attn_mask=(mask := _mask(p, query.device)),
                dropout_p=dropout,
                scale=scaling,
                is_causal=mask is None,
                enable_gqa=gqa,
            )
            for p in paths
        ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _keys(x: Any, path: list[tuple[int, int]]) -> Any:
    """The rows of ``x`` (batch, heads, time, dim) a segment with ``path`` attends to: those of
    the segments above it, then its own."""
    import torch

    if len(path) == 1:
        return x[:, :, path[0][0] : path[0][1]]
    return torch.cat([x[:, :, a:b] for a, b in path], dim=2)


def _mask(path: list[tuple[int, int]], device: Any) -> Any:
    """None for a segment alone (SDPA's causal kernel); otherwise its queries see every key
    above them and their own causally (the diagonal aligned to the bottom right, as the
    queries are the keys' last ones)."""
    import torch

    if len(path) == 1:
        return None
    n, own = sum(b - a for a, b in path), path[-1][1] - path[-1][0]
    return torch.ones(own, n, dtype=torch.bool, device=device).tril(n - own)


@cache
def _cpu_kernels() -> bool:
    """Whether this torch exposes SDPA's CPU flash kernel and its backward as operators."""
    import torch

    ops = torch.ops.aten
    return hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        ops, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


@cache
def _segment_attention() -> Any:
    """An autograd function for a row's segments on a CPU: SDPA's flash kernel per segment,
    forward and backward, with the row's gradients gathered in one buffer per input.

    Autograd through per-segment slices gives the same numbers but pays for each slice a zeroed
    gradient as long as the whole row, then adds them up: with the shared-prefix tree, 130
    slices a layer and 3% of a fine-tuning step. The output is written straight into the
    (batch, time, heads, dim) layout the model reads next, with no concatenation."""
    import torch

    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kernel_back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def additive(path: list[tuple[int, int]], like: Any) -> Any:  # the kernel wants floats
        mask = _mask(path, like.device)
        return None if mask is None else like.new_zeros(mask.shape).masked_fill_(~mask, -torch.inf)

    def swapped(x: Any) -> Any:  # (batch, heads, time, dim) <-> (batch, time, heads, dim)
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3])

    class SegmentAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, query: Any, key: Any, value: Any, paths: list, scale: Any) -> Any:
            out, saved, ctx.masks = swapped(query), [], []
            for path in paths:
                a, b = path[-1]
                mask = additive(path, query)
                ctx.masks.append(mask)  # for the backward, not built again
                o, lse = kernel(query[:, :, a:b], _keys(key, path), _keys(value, path), 0.0,
                                mask is None, attn_mask=mask, scale=scale)  # fmt: skip
                out[:, a:b] = o.transpose(1, 2)
                saved += [o, lse]
            ctx.paths, ctx.scale = paths, scale
            ctx.save_for_backward(query, key, value, *saved)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple:
            query, key, value, *saved = ctx.saved_tensors
            dq, dk, dv = swapped(query), swapped(key).zero_(), swapped(value).zero_()
            for path, mask, o, lse in zip(ctx.paths, ctx.masks, saved[::2], saved[1::2],
                                          strict=True):  # fmt: skip
                a, b = path[-1]
                gq, gk, gv = kernel_back(grad[:, a:b].transpose(1, 2), query[:, :, a:b],
                                         _keys(key, path), _keys(value, path), o, lse, 0.0,
                                         mask is None, attn_mask=mask, scale=ctx.scale)  # fmt: skip
                dq[:, a:b] = gq.transpose(1, 2)
                start = 0
                for x, y in path:
                    dk[:, x:y] += gk[:, :, start : start + y - x].transpose(1, 2)
                    dv[:, x:y] += gv[:, :, start : start + y - x].transpose(1, 2)
                    start += y - x
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None

    return SegmentAttention


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
