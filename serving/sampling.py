"""Choosing the next token from one row of logits, as TGI's ``NextTokenChooser`` does.

Order: repetition penalty (on prompt and output, HF/TGI style), OpenAI-style frequency and
presence penalties (on the output), then temperature, top-k, top-p and typical-p. Greedy unless
sampling was asked for (``do_sample``, or any of the warpers set). The reported log-probability is
the chosen token's under the final, renormalized distribution, as TGI reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    return logits


def choose(
    logits: Any,
    params: SamplingParams,
    generator: Any,
    context: list[int],
    generated: list[int],
) -> tuple[int, float]:
    """(token id, log-probability) for one row of logits."""
    import torch

    if params.penalized:
        logits = apply_penalties(logits, params, context, generated)
    if not params.sampling:
        logprobs = torch.log_softmax(logits, dim=-1)
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    if params.top_k > 0 and params.top_k < scores.shape[0]:
        scores, ids = torch.topk(scores, params.top_k)  # sorted, descending
    else:
        ids = None
    if params.top_p < 1.0 or params.typical_p < 1.0:
        if ids is None:
            scores, ids = torch.sort(scores, descending=True)
        scores = _nucleus(scores, params.top_p) if params.top_p < 1.0 else scores
        scores = _typical(scores, params.typical_p) if params.typical_p < 1.0 else scores
    logprobs = torch.log_softmax(scores, dim=-1)
    pick = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
    token = int(ids[pick]) if ids is not None else pick
    return token, float(logprobs[pick])


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
