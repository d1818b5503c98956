"""From (prompt, completion) text to batches, and the loss that spends compute on real tokens only.

    feats, dropped = tokenize_examples(tokenizer, pairs, max_length=512)
    batch = PadToLongest(pad_id)(feats[:4])          # or FlattenBatch()(feats[:4])
    loss = response_loss(model, batch)               # lm_head only where a label is

Three things make fine-tuning here several times faster than the course recipe, none of which
changes what is learned:

1. Micro-batches are padded to their own longest example, not to a fixed 256, and the Trainer's
   length-grouped sampler puts examples of similar length together, so little padding is left.
2. The prompt carries label -100 (no loss), and so does padding; ``response_loss`` runs the
   vocabulary projection (lm_head: n_embd x 50,257 for GPT-2, as big as 4 transformer layers)
   only at positions whose next token carries loss, via ``logits_to_keep`` given a boolean mask.
3. ``FlattenBatch`` packs a micro-batch into one row with no padding at all; ``position_ids``
   restart at 0 for every example and transformers builds a block-diagonal mask from them, so
   packed examples never attend to each other. It pays on GPUs with varlen attention; on CPU
   the bench (bench/train_throughput.py) shows length-grouped padding is faster, so that is the
   default.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE = -100  # label value that carries no loss (the convention of torch and transformers)


def tokenize_examples(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels for each (prompt, completion); labels are IGNORE on the prompt.

    The two halves are tokenized apart so the boundary is exact. Over-long examples are cut at
    ``max_length``; one whose prompt leaves no room for any of the answer is dropped (counted in
    the second return value), since it would teach nothing.
    """
    prompts = [p for p, _ in pairs]
    completions = [c for _, c in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if pairs else []
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if pairs else []
    features, dropped = [], 0
    for p, c in zip(p_ids, c_ids, strict=True):
        if not c or len(p) >= max_length:
            dropped += 1
            continue
        ids = (p + c)[:max_length]
        labels = ([IGNORE] * len(p) + c)[:max_length]
        features.append({"input_ids": ids, "labels": labels})
    return features, dropped


@dataclass
class PadToLongest:
    """Pad a micro-batch on the right to its own longest example (labels with IGNORE)."""

    pad_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class FlattenBatch:
    """Pack a micro-batch into one row with no padding; position_ids restart per example.

    The first label of every example is IGNORE, so no example is trained to predict the start
    of the next one.
    """

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels, pos = [], [], []
        for f in features:
            k = len(f["input_ids"])
            ids += f["input_ids"]
            labels += [IGNORE, *f["labels"][1:]]
            pos += range(k)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
        }


def loss_positions(labels: Any) -> tuple[Any, Any]:
    """(keep, targets): ``keep[b, t]`` is True where token t+1 carries loss; ``targets`` are
    those next tokens, in the order ``hidden[keep]`` yields positions."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def _takes_logits_to_keep(model: Any) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)  # DDP
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def response_loss(
    model: Any, batch: dict[str, Any], num_items: Any = None, *, reduction: str = "mean"
) -> Any:
    """Next-token cross-entropy over the positions that carry loss, and nowhere else.

    ``num_items`` (the Trainer's count of loss tokens across the accumulated micro-batches)
    makes every token weigh the same however the batch was split; without it, the mean over
    this micro-batch. ``reduction="none"`` gives the per-token losses.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    keep, targets = loss_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    else:  # an architecture without the mask: same result, full-size logits
        logits = model(**inputs, use_cache=False).logits[keep]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    if reduction == "none":
        return losses
    if num_items is not None:
        return losses.sum() / num_items
    return losses.sum() / max(targets.numel(), 1)
