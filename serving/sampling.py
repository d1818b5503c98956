"""Choosing the next token from one row of logits, as TGI's ``NextTokenChooser`` does.

Order (TGI's): watermark, repetition penalty (on prompt and output, HF/TGI style),
OpenAI-style frequency and presence penalties (on the output), the grammar's mask, then
temperature, top-k, top-p and typical-p. Greedy unless sampling was asked for (``do_sample``,
or any of the warpers set). The reported log-probability is the chosen token's under the final,
renormalized distribution, and ``top_n`` alternatives come from that same distribution, as TGI
reports them.

Every step stays finite whatever the (validated) parameters: a temperature of 1.4e-45 (the
smallest positive float32, which TGI accepts) divides logits shifted to a maximum of 0, so the
distribution collapses onto the top token instead of turning into inf - inf = NaN; penalties
are clamped to float32's range. A failure that still happens ends only its own sequence
(engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving import constants as C


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    watermark: bool = False

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when any warper would change the distribution."""
        return (
            self.do_sample
            or self.temperature != 1.0
            or self.top_k > 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
        )

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob) of the most likely tokens; [] unless asked


def watermark(logits: Any, previous: int) -> Any:
    """TGI's ``WatermarkLogitsProcessor`` (Kirchenbauer et al.): a green list of half the
    vocabulary, drawn from the previous token, gets a bonus of 2."""
    import torch

    g = torch.Generator(device=logits.device).manual_seed(C.WATERMARK_HASH_KEY * previous)
    vocab = logits.shape[0]
    green = torch.randperm(vocab, device=logits.device, generator=g)[
        : int(vocab * C.WATERMARK_GAMMA)
    ]
    logits = logits.clone()
    logits[green] += C.WATERMARK_DELTA
    return logits


def apply_penalties(
    logits: Any, params: SamplingParams, context: list[int], generated: list[int]
) -> Any:
    import torch

    logits = logits.clone()
    if params.repetition_penalty != 1.0 and context:
        ids = torch.tensor(context, device=logits.device).unique()
        picked = logits[ids]
        logits[ids] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if (params.frequency_penalty or params.presence_penalty) and generated:
        counts = torch.bincount(
            torch.tensor(generated, device=logits.device), minlength=logits.shape[0]
        ).to(logits.dtype)
        logits -= params.frequency_penalty * counts
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    # an extreme penalty (1.4e-45 or 3.4e38) overflows: keep every logit a finite float32
    biggest = torch.finfo(logits.dtype).max
    return torch.nan_to_num_(logits, nan=-biggest, posinf=biggest, neginf=-biggest)


def choose(
    logits: Any,
    params: SamplingParams,
    generator: Any,
    context: list[int],
    generated: list[int],
    *,
    allowed: Any = None,
    top_n: int = 0,
    shortlist: tuple[Any, Any] | None = None,
) -> Choice:
    """The next token for one row of logits. ``allowed``: the grammar's boolean mask over the
    vocabulary (None: every token); ``top_n``: how many alternatives to report;
    ``shortlist``: this row's ``torch.topk(logits, top_k)`` (values, ids), when the engine
    took it for the whole batch at once (plain top-k sampling only)."""
    import torch

    if params.watermark:
        logits = watermark(logits, (generated or context)[-1])
    if params.penalized:
        logits = apply_penalties(logits, params, context, generated)
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if not params.sampling:
        logprobs = torch.log_softmax(logits, dim=-1)
        token = int(torch.argmax(logits))
        top = top_tokens(logprobs, None, top_n) if top_n else []
        return Choice(token, float(logprobs[token]), top)
    scores = logits
    if shortlist is not None:
        scores, ids = shortlist
    elif params.top_k > 0 and params.top_k < scores.shape[0]:
        scores, ids = torch.topk(scores, params.top_k)  # sorted, descending
    else:
        ids = None
    if params.temperature != 1.0:
        # top-k commutes with a positive temperature; shifting to a max of 0 keeps a tiny
        # temperature from overflowing (x / 1.4e-45 = inf, and inf - inf = NaN)
        scores = (scores - scores.max()) / params.temperature
    if params.top_p < 1.0 or params.typical_p < 1.0:
        if ids is None:
            scores, ids = torch.sort(scores, descending=True)
        scores = _nucleus(scores, params.top_p) if params.top_p < 1.0 else scores
        scores = _typical(scores, params.typical_p) if params.typical_p < 1.0 else scores
    logprobs = torch.log_softmax(scores, dim=-1)
    pick = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
    token = int(ids[pick]) if ids is not None else pick
    top = top_tokens(logprobs, ids, top_n) if top_n else []
    return Choice(token, float(logprobs[pick]), top)


def top_tokens(logprobs: Any, ids: Any, n: int) -> list[tuple[int, float]]:
    """TGI's ``batch_top_tokens``: the ``n`` likeliest, and every token tied with the n-th;
    tokens the warpers removed (log-probability -inf) are never among them."""
    import torch

    k = min(n, logprobs.shape[0])
    values, index = torch.topk(logprobs, k)
    nth = float(values[-1])
    if nth == float("-inf"):
        nth = torch.finfo(logprobs.dtype).min
    ties = int((logprobs >= nth).sum())
    if ties > k:
        values, index = torch.topk(logprobs, ties)
    keep = values > float("-inf")
    values, index = values[keep], index[keep]
    if ids is not None:
        index = ids[index]
    return list(zip(index.tolist(), values.tolist(), strict=True))


def _nucleus(sorted_scores: Any, top_p: float) -> Any:
    """Keep the smallest head of the (descending) distribution whose mass reaches top_p."""
    import torch

    probs = torch.softmax(sorted_scores, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    return sorted_scores.masked_fill(before >= top_p, float("-inf"))


def _typical(sorted_scores: Any, typical_p: float) -> Any:
    """Typical decoding: keep tokens whose surprise is closest to the entropy, up to mass p."""
    import torch

    logp = torch.log_softmax(sorted_scores, dim=-1)
    p = logp.exp()
    entropy = -(torch.nan_to_num(p * logp)).sum()
    shifted = (-logp - entropy).abs()
    order = torch.argsort(shifted)
    cum = torch.cumsum(p[order], dim=-1)
    keep = (cum - p[order]) < typical_p
    mask = torch.ones_like(sorted_scores, dtype=torch.bool)
    mask[order[keep]] = False
    return sorted_scores.masked_fill(mask, float("-inf"))
