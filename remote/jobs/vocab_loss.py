"""The vocabulary projection and its cross-entropy: where a CPU fine-tuning step spends most on
the fewest useful numbers.

    losses = token_cross_entropy(logits, targets)          # any logits; consumes them
    use_fused_head(model)                                   # before LoRA; fp32, one process
    losses = head_cross_entropy(model, inputs, keep, targets)   # None: use the line above

For GPT-2 the projection (lm_head, tied to the input embedding) is a 768 x 50,257 matrix: at
the loss positions of a micro-batch its logits are tens of megabytes, and its weight gradient
is 154 MB. Both functions here compute exactly what ``F.cross_entropy`` on ``lm_head(hidden)``
computes, forward and backward, with fewer and cheaper passes over those arrays:

- ``token_cross_entropy`` turns the logits into their own gradient in place, instead of
  allocating three more tensors of that size (log-softmax, and two gradients on the way back).
- ``head_cross_entropy`` also does the projection, CPU fp32 only. Its logits go into rows
  padded to a multiple of 64 floats (a 50,257-float row leaves the matrix products misaligned:
  on the 2-core bench machine the forward ran at ~100 GFLOP/s against ~150 aligned), and the
  weight's gradient is added straight into ``weight.grad`` by one matrix product, where autograd
  would allocate and page in a fresh 154 MB matrix per micro-batch and then add it (a step's
  first product goes into last step's matrix, once the Trainer has let go of it). Writing
  ``.grad`` directly is only right for a plain ``loss.backward()`` on one process, which is what
  the Trainer does there; under DDP, autocast or on a GPU the model takes the path above. So
  does mixed precision: accelerate autocasts inside the model's own forward, which the fused
  head goes around, so finetune.prepare_model approves the head for fp32 runs only.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

FUSED_HEAD = "tinycloud_fused_head"  # attribute use_fused_head sets on the model it approves
ROW_ALIGN = 64  # floats: logits rows are padded to a multiple of this (256 bytes)


def token_cross_entropy(logits: Any, targets: Any) -> Any:
    """Per-token cross-entropy of ``logits`` (positions x vocabulary), computed in place.

    The same numbers and gradient as ``F.cross_entropy(..., reduction="none")``. ``logits`` is
    consumed: use only the returned losses.
    """
    losses, _ = _functions()[0].apply(logits, targets)
    return losses


def use_fused_head(model: Any) -> bool:
    """Let ``head_cross_entropy`` take over ``model``'s output layer, if that gives the same
    logits; returns whether it does.

    The model must be a causal LM whose output layer is a bias-free linear map of its base
    model's last hidden state, with nothing after it (no logit scaling or soft-capping): a
    short probe compares the two on a few tokens, so an architecture that does more keeps its
    own forward. Call it before adding LoRA and only when training on one process.
    """
    import torch
    from torch import nn

    from remote.jobs.models import probing

    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None or not hasattr(model, "base_model"):
        return False
    ids = torch.randint(0, head.out_features, (1, 7), generator=torch.Generator().manual_seed(0))
    ids = ids.to(head.weight.device)
    try:
        with probing(model):
            want = model(ids, use_cache=False).logits[0]
            hidden = model.base_model(ids, use_cache=False).last_hidden_state[0]
            ok = torch.allclose(hidden @ head.weight.t(), want, atol=1e-4, rtol=1e-3)
    except (TypeError, AttributeError, ValueError):
        ok = False
    setattr(model, FUSED_HEAD, ok)
    return ok


def head_cross_entropy(model: Any, inputs: dict[str, Any], keep: Any, targets: Any) -> Any:
    """Per-token losses at the ``keep`` positions of ``inputs`` (batch x time, True where the
    next token carries loss), the projection and loss fused; None where ``use_fused_head`` did
    not approve ``model`` or the step runs somewhere the fused path does not (see the module
    docstring), and the caller computes the logits itself."""
    import torch

    from remote.jobs.models import without_lora

    inner = without_lora(model)  # never DDP's wrapper: the head is not approved under DDP
    if not getattr(inner, FUSED_HEAD, False):
        return None
    weight = inner.get_output_embeddings().weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    hidden = inner.base_model(**inputs, use_cache=False).last_hidden_state
    return _functions()[1].apply(hidden[keep], weight, targets)


def _softmax_gradient_(logits: Any, targets: Any) -> Any:
    """Turn ``logits`` into d(loss)/d(logits) = softmax - one-hot, in place; return the
    per-row losses (logsumexp - target logit)."""
    import torch

    rows = torch.arange(len(targets), device=logits.device)
    picked = logits[rows, targets]
    top = logits.amax(dim=-1, keepdim=True)
    logits.sub_(top).exp_()
    total = logits.sum(dim=-1, keepdim=True)
    logits.div_(total)
    logits[rows, targets] -= 1
    return (top + total.log()).squeeze(-1) - picked


def _add_into_grad(weight: Any, grad_t: Any, hidden: Any) -> None:
    """weight.grad += grad_t @ hidden, in one matrix product into the existing gradient.

    A step's first product, when the Trainer has set ``.grad`` to None, goes into the matrix
    the last step's gradient lived in if nothing else holds it any more: a fresh 154 MB matrix
    is page-faulted in on every step, about 2% of a CPU step.
    """
    import torch

    if weight.grad is None:
        spare = _spare_grads().get(weight)
        reusable = (
            spare is not None
            and sys.getrefcount(spare) == 3  # the dict, this name and getrefcount's argument
            and spare.shape == weight.shape
            and spare.dtype == weight.dtype
            and spare.device == weight.device
        )
        weight.grad = torch.mm(grad_t, hidden, out=spare) if reusable else torch.mm(grad_t, hidden)
        _spare_grads()[weight] = weight.grad
    else:  # a tied embedding's sparse part comes later: its backward runs last
        weight.grad.addmm_(grad_t, hidden)


@cache
def _spare_grads() -> Any:
    """weight -> the tensor its last ``.grad`` was; keyed by identity, gone with the weight."""
    from torch.utils.weak import WeakIdKeyDictionary

    return WeakIdKeyDictionary()


@cache
def _functions() -> tuple[Any, Any]:
    """The autograd Functions, built on first use (torch is imported late, as everywhere in the
    jobs, so ``--help`` answers at once)."""
    import torch

    class TokenCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets):
            losses = _softmax_gradient_(logits, targets)
            ctx.mark_dirty(logits)
            ctx.mark_non_differentiable(logits)
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(logits)
            return losses, logits

        @staticmethod
        def backward(ctx, grad_losses, _unused):
            (grad,) = ctx.saved_tensors
            if grad_losses is None:
                return None, None
            return grad.mul_(grad_losses.unsqueeze(-1)), None

    class HeadCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            vocab = weight.shape[0]
            width = -(-vocab // ROW_ALIGN) * ROW_ALIGN
            logits = hidden.new_empty(len(targets), width)[:, :vocab]
            torch.mm(hidden, weight.t(), out=logits)
            losses = _softmax_gradient_(logits, targets)
            ctx.save_for_backward(hidden, weight, logits)
            ctx.set_materialize_grads(False)
            return losses

        @staticmethod
        def backward(ctx, grad_losses):
            if grad_losses is None:
                return None, None, None
            hidden, weight, grad = ctx.saved_tensors
            grad.mul_(grad_losses.unsqueeze(-1))
            d_hidden = grad @ weight if ctx.needs_input_grad[0] else None
            if ctx.needs_input_grad[1]:
                _add_into_grad(weight, grad.t(), hidden)
            return d_hidden, None, None

    return TokenCrossEntropy, HeadCrossEntropy
