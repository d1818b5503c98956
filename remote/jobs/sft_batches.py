"""From (prompt, completion) text to batches, and the loss that spends compute on real tokens only.

    feats, dropped = tokenize_examples(tokenizer, pairs, max_length=512)
    batch = PadToLongest(pad_id)(feats[:4])          # or FlattenBatch()(feats[:4])
    loss = response_loss(model, batch)               # lm_head only where a label is

What makes fine-tuning here several times faster than the course recipe, none of which changes
what is learned (bench/train_throughput.py measures it):

1. ``FlattenBatch`` (the default) packs a micro-batch's examples end to end in one row with no
   padding at all; ``position_ids`` restart at 0 for every example, and packed_attention.py runs
   attention once per example (the bounds travel as ``cu_seq_lens_q``), so packed examples never
   attend to each other and no block-diagonal mask is ever computed.
2. The prompt carries label -100 (no loss), and so does padding; ``response_loss`` runs the
   vocabulary projection (lm_head: n_embd x 50,257 for GPT-2, as big as 4 transformer layers)
   only at positions whose next token carries loss, via ``logits_to_keep`` given a boolean mask,
   or, for a model ``vocab_loss.use_fused_head`` approved, as one fused projection and loss;
   either way the logits become their own gradient in place (vocab_loss.py).
3. ``PadToLongest`` (``--batching padded``) pads a micro-batch to its own longest example, not
   to a fixed 256, after the Trainer's length-grouped sampler has put similar lengths together;
   ``rebalance`` then re-cuts one optimizer step's micro-batches (same examples, same count) so
   long examples share a micro-batch with long ones and the step computes the fewest padded
   tokens. The gradient is a sum over the step's loss tokens, so how they are split does not
   change it.
4. ``share_prefixes`` computes a prompt beginning that several examples of a packed row share
   (the preamble and headers on every example, and a first few words many instructions share)
   once, and lets each example attend to that one copy (packed_attention.py follows the
   row's ``segment_parents``). A prefix sees only itself (attention is causal), so its hidden
   states are the same in every example that starts with it; the gradients that reach it from
   each example add up in the one copy, so the step's gradient is the same, with fewer tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from remote.jobs.vocab_loss import head_cross_entropy, token_cross_entropy

IGNORE = -100  # label value that carries no loss (the convention of torch and transformers)
PARENTS = "segment_parents"  # share_prefixes' tree: each segment's parent segment, or -1


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
    """Pad a micro-batch on the right to its own longest example (labels with IGNORE), or to
    ``at_least`` tokens: ``--batching max-length`` pads every example to --max-length, as the
    course's ``padding="max_length"`` does."""

    pad_id: int
    at_least: int = 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(self.at_least, *(len(f["input_ids"]) for f in features))
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

        ids, labels, pos, bounds = [], [], [], [0]
        for f in features:
            k = len(f["input_ids"])
            ids += f["input_ids"]
            labels += [IGNORE, *f["labels"][1:]]
            pos += range(k)
            bounds.append(bounds[-1] + k)
        longest = max(len(f["input_ids"]) for f in features)
        cu = torch.tensor(bounds, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
            # Example bounds as flash-attn's varlen kernel and packed_attention read them.
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }


PADDED_KEYS = {"input_ids", "attention_mask", "labels"}  # what PadToLongest makes
PACKED_KEYS = {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
               "max_length_q", "max_length_k"}  # what FlattenBatch makes  # fmt: skip


def merge_packed(
    batches: list[dict[str, Any]],
    max_tokens: int,
    shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One optimizer step's packed rows joined into as few rows of at most ``max_tokens`` as
    fit, in order; each row joined into a later one leaves an empty dict in its place (a
    micro-batch with nothing to compute), so the
    step keeps its number of micro-batches (the Trainer counts them to know when to step),
    and the full rows come last (DDP synchronises gradients on a step's last micro-batch).

    A row of 300 tokens leaves the matrix products short and pays per micro-batch for what
    does not depend on its length: the vocabulary projection's 154 MB weight gradient written
    again, every gradient added into the last one's, the per-call overhead of ~100 operations.
    The gradient is a sum over the step's loss tokens (``num_items``), so how the tokens are
    split does not change it; a row of ``max_tokens`` is what the memory plan allowed for
    (finetune: --batch-size examples as long as the longest).

    ``shape`` (e.g. ``share_prefixes``) is what becomes of a row before it is computed: every
    row comes back shaped, and the cap counts the tokens of the shaped row, the ones whose
    activations the memory plan is about. Anything that is not packed rows comes back as it
    came.
    """
    if len(batches) < 2 or any(set(b) != PACKED_KEYS for b in batches):
        return batches if shape is None else [shape(b) for b in batches]
    plain = shape is None
    shape = shape or (lambda row: row)
    last, rows = batches[0], [shape(batches[0])]  # the last row, before and after shaping
    for b in batches[1:]:
        together = _join_packed([last, b])  # joining a joined row again is joining them all
        joined = shape(together)
        if joined["input_ids"].shape[1] <= max_tokens:
            last, rows[-1] = together, joined
        else:
            last = b
            rows.append(shape(b))
    if plain and len(rows) == len(batches):
        return batches  # nothing joined, nothing shaped
    return [{} for _ in range(len(batches) - len(rows))] + rows


def _join_packed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    if len(rows) == 1:
        return rows[0]
    cat = {
        k: torch.cat([r[k] for r in rows], dim=1) for k in ("input_ids", "labels", "position_ids")
    }
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r["input_ids"].shape[1])
    cu = torch.cat(
        [rows[0]["cu_seq_lens_q"][:1]]
        + [r["cu_seq_lens_q"][1:] + start for r, start in zip(rows, starts, strict=False)]
    )
    longest = max(r["max_length_q"] for r in rows)
    return {**cat, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}  # fmt: skip


def share_prefixes(row: dict[str, Any]) -> dict[str, Any]:
    """A packed row (``FlattenBatch``, ``merge_packed``) with the prompt beginnings its examples
    share stored once, as a tree of segments; the row as it came if nothing is shared.

    The row holds the shared segments first, then each example's own rest (a leaf), each under
    the deepest shared segment it starts with. ``cu_seq_lens_q`` bounds the segments and
    ``PARENTS`` names each one's parent, so a segment attends to the segments above it and to
    itself, causally; positions continue from the parent's end. Only prompt tokens are shared,
    and never an example's last prompt token, whose next token (the answer's first) carries
    loss: a shared segment has no loss position, and every leaf starts with a prompt token.
    """
    import torch

    if set(row) != PACKED_KEYS or row["input_ids"].shape[0] != 1:
        return row
    bounds = row["cu_seq_lens_q"].tolist()
    ids, labels = row["input_ids"][0].tolist(), row["labels"][0].tolist()
    seqs = [ids[a:b] for a, b in pairwise(bounds)]
    labs = [labels[a:b] for a, b in pairwise(bounds)]
    shared, leaves = _prefix_tree(seqs, [_shareable(x) for x in labs])
    if not shared:
        return row
    segs = [(tokens, [IGNORE] * len(tokens), start) for tokens, _, start in shared]
    segs += [(s[start:], [IGNORE, *lab[start + 1 :]], start)
             for s, lab, (start, _) in zip(seqs, labs, leaves, strict=True)]  # fmt: skip
    out_ids, out_labels, pos, cu = [], [], [], [0]
    for tokens, lab, start in segs:
        out_ids += tokens
        out_labels += lab
        pos += range(start, start + len(tokens))
        cu.append(cu[-1] + len(tokens))
    device = row["input_ids"].device
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    parents = [p for _, p, _ in shared] + [p for _, p in leaves]
    return {
        "input_ids": torch.tensor([out_ids], device=device),
        "labels": torch.tensor([out_labels], device=device),
        "position_ids": torch.tensor([pos], device=device),
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t,
        "max_length_q": max(len(t) for t, _, _ in segs),
        "max_length_k": max(len(t) for t, _, _ in segs),
        PARENTS: torch.tensor(parents, dtype=torch.int32, device=device),
    }


def _shareable(labels: list[int]) -> int:
    """How many leading tokens of an example may be shared: those before its last prompt token
    (the last position whose next token carries no loss)."""
    for t in range(1, len(labels)):
        if labels[t] != IGNORE:
            return t - 1
    return len(labels) - 1


def _prefix_tree(
    seqs: list[list[int]], limits: list[int]
) -> tuple[list[tuple[list[int], int, int]], list[tuple[int, int]]]:
    """The runs of tokens that two or more of ``seqs`` begin with (within their ``limits``), as
    (tokens, parent segment, start position), parents first; and each sequence's leaf as
    (start, parent segment), -1 for none. A radix tree, built by grouping on the next token."""
    shared: list[tuple[list[int], int, int]] = []
    leaves = [(0, -1)] * len(seqs)
    pending = [(list(range(len(seqs))), 0, -1)]
    while pending:
        members, start, parent = pending.pop()
        groups: dict[int, list[int]] = {}
        for i in members:
            if limits[i] > start:
                groups.setdefault(seqs[i][start], []).append(i)
            else:
                leaves[i] = (start, parent)
        for group in groups.values():
            if len(group) < 2:
                leaves[group[0]] = (start, parent)
                continue
            end = start + 1
            while all(limits[i] > end for i in group) and len({seqs[i][end] for i in group}) == 1:
                end += 1
            shared.append((seqs[group[0]][start:end], parent, start))
            pending.append((group, end, len(shared) - 1))
    return shared, leaves


def segment_paths(bounds: list[int], parents: list[int] | None) -> list[list[tuple[int, int]]]:
    """Each segment's token ranges, root first and its own last: the keys it attends to in a
    ``share_prefixes`` row (``parents`` None: each segment alone)."""
    spans = list(pairwise(bounds))
    paths = []
    for s, span in enumerate(spans):
        path, p = [span], (parents[s] if parents else -1)
        while p >= 0:
            path.append(spans[p])
            p = parents[p]
        paths.append(path[::-1])
    return paths


def attention_spans(batch: dict[str, Any]) -> list[tuple[int, int]]:
    """(queries, keys) of each attention a batch computes, per layer: an example's length twice
    when packed, a shared prefix's ancestors added to its keys, a padded row's length twice.
    Benches count FLOPs from these."""
    ids = batch["input_ids"]
    if "cu_seq_lens_q" not in batch:
        return [(ids.shape[1], ids.shape[1])] * ids.shape[0]
    parents = batch.get(PARENTS)
    tree = None if parents is None else parents.tolist()
    paths = segment_paths(batch["cu_seq_lens_q"].tolist(), tree)
    return [(path[-1][1] - path[-1][0], sum(b - a for a, b in path)) for path in paths]


def rebalance(batches: list[dict[str, Any]], pad_id: int) -> list[dict[str, Any]]:
    """The same examples in as many micro-batches, cut where they waste the least padding.

    The Trainer's length-grouped sampler sorts examples within a mega-batch, but one step's
    micro-batches of a fixed size still mix a 300-token example with three of 60, each padded
    to 300. Here the step's examples are sorted by length and split into the same number of
    contiguous groups, minimising the padded tokens computed; no group is larger (in padded
    tokens) than the largest micro-batch it replaces, so peak memory does not grow. Anything
    that is not a right-padded ``PadToLongest`` batch (packed rows, other keys) is returned
    as it came.
    """
    if len(batches) < 2 or any(set(b) != PADDED_KEYS for b in batches):
        return batches
    rows = [_unpad(b) for b in batches]
    examples = sorted((r for rs in rows for r in rs), key=lambda f: len(f["input_ids"]))
    cap = max(b["input_ids"].numel() for b in batches)
    cuts = _least_padding_cuts([len(f["input_ids"]) for f in examples], len(batches), cap)
    if cuts is None:
        return batches
    pad = PadToLongest(pad_id)
    device = batches[0]["input_ids"].device
    return [
        {k: v.to(device) for k, v in pad(examples[a:b]).items()}
        for a, b in pairwise([0, *cuts, len(examples)])
    ]


def _unpad(batch: dict[str, Any]) -> list[dict[str, list[int]]]:
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    return [
        {"input_ids": i[:k], "labels": lab[:k]}
        for i, lab, k in zip(ids, labels, lengths, strict=True)
    ]


def _least_padding_cuts(lengths: list[int], groups: int, cap: int) -> list[int] | None:
    """Cut points splitting ascending ``lengths`` into ``groups`` contiguous non-empty groups
    with the least sum of (group size x its longest), each at most ``cap``; None if none fits.

    A group's cost is its size times its last (longest) length, so a dynamic programme over
    (groups used, examples placed) finds the best split exactly: n is one step's examples.
    """
    n, inf = len(lengths), float("inf")
    if groups > n:
        return None
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    back = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        for end in range(g, n + 1):
            for start in range(g - 1, end):
                size = (end - start) * lengths[end - 1]
                cost = best[g - 1][start] + size
                if size <= cap and cost < best[g][end]:
                    best[g][end], back[g][end] = cost, start
    if best[groups][n] == inf:
        return None
    cuts, end = [], n
    for g in range(groups, 1, -1):
        end = back[g][end]
        cuts.append(end)
    return cuts[::-1]


def loss_positions(labels: Any) -> tuple[Any, Any]:
    """(keep, targets): ``keep[b, t]`` is True where token t+1 carries loss; ``targets`` are
    those next tokens, in the order ``hidden[keep]`` yields positions."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def _takes_logits_to_keep(model: Any) -> bool:
    from remote.jobs.models import without_lora

    inner = without_lora(model)
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
    labels = batch["labels"]
    keep, targets = loss_positions(labels)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses = head_cross_entropy(model, inputs, keep, targets)
    if losses is None:  # the model's own lm_head
        if _takes_logits_to_keep(model):
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        else:  # an architecture without the mask: same result, full-size logits
            logits = model(**inputs, use_cache=False).logits[keep]
        losses = token_cross_entropy(logits.float(), targets)
    if reduction == "none":
        return losses
    if num_items is not None:
        return losses.sum() / num_items
    return losses.sum() / max(targets.numel(), 1)
