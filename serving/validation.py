"""TGI's request validation: the same rules, in the same order, with the same messages.

A request that breaks a rule gets ``422 {"error": <message>, "error_type": "validation"}``
before it takes a place in the queue. Messages are TGI 3.x's (router/src/validation.rs) so a
client that matches on them keeps working.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from serving import constants as C
from serving.sampling import SamplingParams
from serving.schema import GenerateParameters


class ValidationError(ValueError):
    """A request the server will not run; the message goes back to the client verbatim."""


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int = C.MAX_STOP_SEQUENCES


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request, ready for the engine."""

    input_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    sampling: SamplingParams
    seed: int
    prefill_details: bool = False


def check_parameters(p: GenerateParameters, limits: Limits) -> SamplingParams:
    """The checks that need no tokenizer."""
    if p.best_of is not None and p.best_of != 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
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
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
            f"Given: {len(p.stop)}"
        )
    if any(s == "" for s in p.stop):
        raise ValidationError("`stop` sequences cannot be empty")
    if p.top_n_tokens:
        raise ValidationError("`top_n_tokens` != 0 is not allowed for this endpoint")
    if p.grammar is not None:
        raise ValidationError("grammar is not supported")
    if p.watermark:
        raise ValidationError("`watermark` is not supported by this server")
    if p.adapter_id:
        raise ValidationError("`adapter_id` is not supported by this server (no LoRA adapters)")
    return SamplingParams(
        do_sample=p.do_sample,
        temperature=temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=repetition,
        frequency_penalty=frequency,
        presence_penalty=presence,
    )


def build_spec(
    inputs: str, input_ids: list[int], p: GenerateParameters, limits: Limits
) -> GenerationSpec:
    """Validate a whole request against TGI's rules; ``input_ids`` is ``inputs`` tokenized."""
    sampling = check_parameters(p, limits)
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if p.truncate is not None:
        if p.truncate <= 0 or p.truncate > limits.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than "
                f"{limits.max_input_tokens}. Given: {p.truncate}"
            )
        input_ids = input_ids[-p.truncate :]
    n_in = len(input_ids)
    if n_in == 0:
        raise ValidationError("`inputs` tokenized to nothing; send some text")
    if p.max_new_tokens is None:
        max_new = min(max(limits.max_total_tokens - n_in, 0), C.DEFAULT_MAX_NEW_TOKENS_CAP)
    else:
        max_new = p.max_new_tokens
    if n_in + max_new > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {n_in} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    if n_in > limits.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n_in}"
        )
    seed = p.seed if p.seed is not None else random.getrandbits(63)  # a sampling seed, not a secret
    return GenerationSpec(
        input_ids=list(input_ids),
        max_new_tokens=max_new,
        stop=tuple(p.stop),
        sampling=sampling,
        seed=seed,
        prefill_details=p.decoder_input_details,
    )
