"""TGI's request validation: the same rules, in the same order, with the same messages.

A request that breaks a rule gets ``422 {"error": "Input validation error: <message>",
"error_type": "validation"}`` before it takes a place in the queue. Messages are TGI 3.3's
(router/src/validation.rs, ``ValidationError``) so a client that matches on them keeps working.

Validation runs in two halves, as in TGI: ``check_parameters`` needs no tokenizer and runs on
the event loop; ``build_spec`` counts tokens and runs in a validation worker (tokenizing.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from serving import constants as C
from serving.sampling import SamplingParams
from serving.schema import GenerateParameters


class ValidationError(ValueError):
    """A request the server will not run; the message goes back to the client (TGI's words)."""


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int = C.MAX_STOP_SEQUENCES
    max_best_of: int = C.MAX_BEST_OF
    max_top_n_tokens: int = C.MAX_TOP_N_TOKENS


@dataclass(frozen=True)
class Checked:
    """What ``check_parameters`` made of the parameters: the part that needs no tokenizer."""

    sampling: SamplingParams
    best_of: int
    top_n_tokens: int
    truncate: int | None


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request, ready for the engine."""

    input_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    sampling: SamplingParams
    seed: int
    prefill_details: bool = False
    top_n_tokens: int = 0
    grammar: Any = None  # grammar.Grammar: a compiled constraint, one matcher per sequence


def wants_sampling(p: GenerateParameters) -> bool:
    """TGI's router rule for ``best_of``: any warper given, even at its neutral value."""
    given = (p.temperature, p.top_k, p.top_p, p.typical_p)
    return p.do_sample or any(v is not None for v in given)


def check_best_of(best_of: int, limits: Limits, *, stream: bool) -> None:
    """TGI checks ``best_of`` before the rest: not on streams, and at most ``max_best_of``."""
    if stream:
        if best_of != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        return
    if best_of > 1 and limits.max_best_of == 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of > limits.max_best_of:
        raise ValidationError(
            f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}"
        )


def check_parameters(
    inputs: str, p: GenerateParameters, limits: Limits, *, stream: bool = False
) -> Checked:
    """Everything ``Validation::validate`` checks before it tokenizes, in its order."""
    best_of = 1 if p.best_of is None else p.best_of
    check_best_of(best_of, limits, stream=stream)
    if stream and p.decoder_input_details:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if best_of > 1 and not wants_sampling(p):
        raise ValidationError("you must use sampling when `best_of` is > 1")
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    repetition = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    presence = 0.0 if p.presence_penalty is None else p.presence_penalty
    if not -2.0 <= presence <= 2.0:
        raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
            f"Given: {len(p.stop)}"
        )
    if any(s == "" for s in p.stop):
        raise ValidationError("`stop` sequences cannot be empty")  # TGI would never stop on ""
    if p.seed is not None and best_of > 1:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    top_n = p.top_n_tokens or 0
    if top_n > limits.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}"
        )
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than "
            f"{limits.max_input_tokens}. Given: {p.truncate}"
        )
    sampling = SamplingParams(
        do_sample=p.do_sample,
        temperature=temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=repetition,
        frequency_penalty=frequency,
        presence_penalty=presence,
        watermark=p.watermark,
    )
    return Checked(sampling, best_of, top_n, p.truncate)


def max_new_tokens_for(n_in: int, p: GenerateParameters, limits: Limits) -> int:
    """TGI 3: omitted means as many as the context allows, capped at 1024 per round."""
    if p.max_new_tokens is None:
        return min(max(limits.max_total_tokens - n_in, 0), C.DEFAULT_MAX_NEW_TOKENS_CAP)
    return p.max_new_tokens


def check_lengths(n_in: int, max_new: int, limits: Limits, *, at_least: bool = False) -> None:
    """TGI's two length rules, total first. ``at_least``: ``n_in`` is a lower bound (the input
    was refused by its size, before it was tokenized)."""
    given = f"at least {n_in}" if at_least else str(n_in)
    if n_in + max_new > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {given} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    if n_in > limits.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {given}"
        )


def build_spec(
    input_ids: list[int],
    p: GenerateParameters,
    checked: Checked,
    limits: Limits,
    grammar: Any = None,
) -> GenerationSpec:
    """The token-count rules; ``input_ids`` is the input tokenized (and truncated)."""
    n_in = len(input_ids)
    if n_in == 0:
        raise ValidationError("`inputs` tokenized to nothing; send some text")
    max_new = max_new_tokens_for(n_in, p, limits)
    check_lengths(n_in, max_new, limits)
    # TGI draws a u64 seed when none is given; a sampling seed, not a secret
    seed = p.seed if p.seed is not None else random.getrandbits(64)
    return GenerationSpec(
        input_ids=list(input_ids),
        max_new_tokens=max_new,
        stop=tuple(p.stop),
        sampling=checked.sampling,
        seed=seed,
        prefill_details=p.decoder_input_details,
        top_n_tokens=checked.top_n_tokens,
        grammar=grammar,
    )
