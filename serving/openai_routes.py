"""The OpenAI-compatible routes TGI also serves: /v1/completions, /v1/chat/completions,
/v1/models. Same engine and validation as /generate; OpenAI's shapes on the wire.

As in TGI: ``temperature: 0`` means greedy, any other temperature samples; chat renders the
conversation with the model's own chat template; streams end with ``data: [DONE]``; EOS is
reported as ``finish_reason: "stop"`` and a stop sequence as ``"stop_sequence"``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from serving import sse
from serving.engine import GenerationFailed
from serving.schema import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    GenerateParameters,
    OutputMessage,
    Usage,
    openai_finish_reason,
)
from serving.service import Service
from serving.validation import ValidationError

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


def to_parameters(req: CompletionRequest | ChatRequest) -> GenerateParameters:
    if req.n not in (None, 1):
        raise ValidationError("`n` > 1 is not supported; send the request n times")
    greedy = req.temperature == 0.0
    return GenerateParameters(
        do_sample=not greedy,
        temperature=None if greedy else req.temperature,
        top_p=req.top_p,
        max_new_tokens=req.max_tokens,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stop_list(),
        details=True,
    )


def _usage(prompt: int, completion: int) -> Usage:
    total = prompt + completion
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    lm = _service(request).loaded
    return {
        "object": "list",
        "data": [{"id": lm.model_id, "object": "model", "created": 0, "owned_by": "tinycloud"}],
    }


def _meta(service: Service, prefix: str) -> dict[str, Any]:
    """The fields every OpenAI response (and each chunk of a stream) repeats."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": service.loaded.model_id,
        "system_fingerprint": service.fingerprint,
    }


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Any:
    service = _service(request)
    params = to_parameters(req)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise ValidationError("`prompt` cannot be an empty list")
    meta = _meta(service, "cmpl")
    if req.stream:
        if len(prompts) != 1:
            raise ValidationError("streaming takes a single `prompt`, not a list")
        spec = service.prepare(prompts[0], params)
        stream = service.submit(spec)
        events = completion_events(service, stream, meta, len(spec.input_ids), req)
        return StreamingResponse(events, media_type="text/event-stream", headers=sse.HEADERS)
    specs = [service.prepare(p, params) for p in prompts]  # validate all before running any
    choices, used_in, used_out = [], 0, 0
    for i, spec in enumerate(specs):
        end = await service.complete(spec, request)
        reason = openai_finish_reason(end.finish_reason)
        choices.append(CompletionChoice(index=i, text=end.generated_text, finish_reason=reason))
        used_in, used_out = used_in + end.input_length, used_out + end.generated_tokens
    return Completion(**meta, choices=choices, usage=_usage(used_in, used_out)).model_dump()


async def completion_events(
    service: Service, stream: Any, meta: dict[str, Any], n_in: int, req: CompletionRequest
) -> AsyncIterator[str]:
    try:
        async for token, end in service.stream(stream):
            text = "" if token.special else token.text
            reason = openai_finish_reason(end.finish_reason) if end else None
            choice = CompletionChoice(index=0, text=text, finish_reason=reason)
            yield sse.event(Completion(**meta, choices=[choice]))
            if end and req.stream_options and req.stream_options.include_usage:
                usage = _usage(n_in, end.generated_tokens)
                yield sse.event(Completion(**meta, choices=[], usage=usage))
    except GenerationFailed as e:
        yield sse.error_event(e)
    yield sse.DONE


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request) -> Any:
    service = _service(request)
    params = to_parameters(req)
    prompt = service.chat_prompt(req.messages)
    # The template already placed any special tokens (as TGI: add_special_tokens=false).
    spec = service.prepare(prompt, params, add_special_tokens=False)
    meta = _meta(service, "chatcmpl")
    if req.stream:
        stream = service.submit(spec)
        events = chat_events(service, stream, meta, len(spec.input_ids), req)
        return StreamingResponse(events, media_type="text/event-stream", headers=sse.HEADERS)
    end = await service.complete(spec, request)
    choice = ChatChoice(
        index=0,
        message=OutputMessage(content=end.generated_text),
        finish_reason=openai_finish_reason(end.finish_reason),
    )
    usage = _usage(end.input_length, end.generated_tokens)
    return ChatCompletion(**meta, choices=[choice], usage=usage).model_dump()


async def chat_events(
    service: Service, stream: Any, meta: dict[str, Any], n_in: int, req: ChatRequest
) -> AsyncIterator[str]:
    try:
        async for token, end in service.stream(stream):
            text = "" if token.special else token.text
            reason = openai_finish_reason(end.finish_reason) if end else None
            choice = ChatChunkChoice(index=0, delta=ChatDelta(content=text), finish_reason=reason)
            yield sse.event(ChatCompletionChunk(**meta, choices=[choice]))
            if end and req.stream_options and req.stream_options.include_usage:
                usage = _usage(n_in, end.generated_tokens)
                yield sse.event(ChatCompletionChunk(**meta, choices=[], usage=usage))
    except GenerationFailed as e:
        yield sse.error_event(e)
    yield sse.DONE
