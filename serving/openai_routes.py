"""The OpenAI-compatible routes TGI also serves: /v1/completions, /v1/chat/completions,
/v1/models, and TGI's /chat_tokenize. Same engine and validation as /generate; OpenAI's shapes.

As in TGI 3.3 (router/src/server.rs, lib.rs, chat.rs): ``temperature: 0`` means greedy, any
other temperature samples; chat renders the conversation with the model's own chat template,
takes ``response_format`` as a grammar and ``top_logprobs`` as ``top_n_tokens``; streams end
with ``data: [DONE]`` and report a failure as ``{"error": {"message", "http_status_code"}}``;
EOS is ``finish_reason: "stop"`` in final answers (a streamed completion's last chunk keeps
TGI's ``eos_token``). ``model`` picks the served model as ``adapter_id`` does on TGI's routes
("tgi" or none: the server's own).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving import constants as C
from serving import sse
from serving.engine import Finished, TokenOut
from serving.replies import ERRORS, SSE, TGIRoute, begin, error_body, finite
from serving.schema import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    ChatTokenizeResponse,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ContentLogprob,
    GenerateParameters,
    ModelCard,
    ModelList,
    OpenAIErrorDetail,
    OpenAIErrorEvent,
    OutputMessage,
    TopLogprob,
    Usage,
    openai_finish_reason,
)
from serving.service import (
    Prepared,
    RequestError,
    Served,
    Service,
    Ticket,
    ToolError,
    timing_headers,
)

router = APIRouter(route_class=TGIRoute)


def _service(request: Request) -> Service:
    return request.app.state.service


def _sampling(temperature: float | None) -> tuple[bool, float | None]:
    """TGI: ``temperature: 0`` is greedy; anything else (or nothing) samples."""
    return (False, None) if temperature == 0.0 else (True, temperature)


def completion_parameters(req: CompletionRequest) -> GenerateParameters:
    do_sample, temperature = _sampling(req.temperature)
    return GenerateParameters(
        do_sample=do_sample,
        temperature=temperature,
        top_p=req.top_p,
        max_new_tokens=req.max_tokens,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stop_list(),
        details=True,  # TGI also asks for decoder_input_details, which it then drops
    )


def chat_parameters(req: ChatRequest) -> GenerateParameters:
    """TGI's ``ChatRequest::try_into_generate`` (presence_penalty kept as OpenAI's, see docs)."""
    constrained = req.response_format is not None and req.response_format.type != "text"
    if req.tools and constrained:
        raise ToolError("Grammar and tools are mutually exclusive")
    if req.tools:
        raise ToolError("tools are not supported by this server; see docs/serving.md")
    do_sample, temperature = _sampling(req.temperature)
    return GenerateParameters(
        do_sample=do_sample,
        temperature=temperature,
        top_p=req.top_p,
        max_new_tokens=req.max_tokens if req.max_tokens is not None else req.max_completion_tokens,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        seed=req.seed,
        stop=req.stop_list(),
        details=True,
        top_n_tokens=req.top_logprobs,
    )


def _usage(prompt: int, completion: int) -> Usage:
    total = prompt + completion
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def _served(service: Service, model: str | None) -> Served:
    """TGI reads ``model`` as the adapter id unless it is absent or "tgi"."""
    return service.pick(None if model in (None, "tgi") else model)


def _meta(service: Service, prefix: str, model: str) -> dict[str, Any]:
    """The fields every OpenAI response (and each chunk of a stream) repeats."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": service.fingerprint,
    }


def openai_error_event(exc: BaseException) -> str:
    """TGI's OpenAI stream error: the message, and 422 whatever went wrong."""
    message = error_body(exc)[1]["error"]
    return sse.event(
        OpenAIErrorEvent(error=OpenAIErrorDetail(message=message, http_status_code=422))
    )


def _logprobs(token: TokenOut) -> ContentLogprob:
    top = [TopLogprob(token=t.text, logprob=finite(t.logprob)) for t in token.top]
    return ContentLogprob(token=token.text, logprob=finite(token.logprob), top_logprobs=top)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> dict[str, Any]:
    """Every served id, the server's own first (TGI lists its one model)."""
    cards = [
        ModelCard(id=s.id, owned_by=s.id, prompt_format=s.loaded.prompt_format)
        for s in _service(request).served.values()
    ]
    return ModelList(data=cards).model_dump()


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**ERRORS, 200: {"content": SSE, "description": "An answer, or a stream"}},
)
async def completions(req: CompletionRequest, request: Request) -> Response:
    service = _service(request)
    ticket = begin(request)
    if req.suffix is not None:
        raise RequestError(
            C.ERROR_SUFFIX,
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
        )
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) > C.MAX_CLIENT_BATCH_SIZE:
        raise RequestError(
            C.ERROR_BATCH_SIZE,
            "Number of prompts exceeds the maximum allowed batch size of "
            f"{C.MAX_CLIENT_BATCH_SIZE}",
        )
    served = _served(service, req.model)
    params = completion_parameters(req)
    meta = _meta(service, "cmpl", served.id)
    prepared = [await service.prepare(p, params, stream=req.stream, served=served) for p in prompts]
    if req.stream:  # all prompts decode together; their events come prompt by prompt
        streams = [service.submit(p)[0] for p in prepared]

        def closed() -> None:
            for s in streams:
                s.cancel()
            ticket.settle(C.CANCELLED)

        return sse.EventStream(completion_events(service, streams, meta, ticket), closed)
    ends = await service.complete(Prepared.together(prepared), request, ticket)
    choices = [
        CompletionChoice(
            index=i, text=e.generated_text, finish_reason=openai_finish_reason(e.finish_reason)
        )
        for i, e in enumerate(ends)
    ]
    n_in = sum(e.input_length for e in ends)
    usage = _usage(n_in, sum(e.generated_tokens for e in ends))
    body = Completion(**meta, choices=choices, usage=usage).model_dump()
    headers = _summed_headers(ticket, ends, prepared, service.loaded.device)
    return JSONResponse(body, headers=headers)


def _summed_headers(
    ticket: Ticket, ends: list[Finished], prepared: list[Prepared], compute_type: str
) -> dict[str, str]:
    """TGI adds up the x-* headers of a multi-prompt completion."""
    each = [
        timing_headers(ticket, e, p.characters, compute_type)
        for e, p in zip(ends, prepared, strict=True)
    ]
    out = dict(each[0])
    for key in out:
        if key not in ("x-compute-type", "x-compute-time"):
            out[key] = str(sum(int(h[key]) for h in each))
    return out


async def completion_events(
    service: Service, streams: list[Any], meta: dict[str, Any], ticket: Ticket
) -> AsyncIterator[str]:
    """One chunk per token (prompts in turn); the last chunk of each prompt carries TGI's
    finish reason and the usage."""
    try:
        for index, stream in enumerate(streams):
            last = index == len(streams) - 1  # the books count the call once, at its end
            async for token, end in service.stream(stream, ticket, settle=last):
                text = "" if token.special else token.text
                if end is None:
                    choice = CompletionChoice(index=index, text=text, finish_reason="")
                    yield sse.event(Completion(**meta, choices=[choice]))
                    continue
                choice = CompletionChoice(
                    index=index, text=text, finish_reason=str(end.finish_reason)
                )
                usage = _usage(end.input_length, end.generated_tokens)
                yield sse.event(Completion(**meta, choices=[choice], usage=usage))
    except Exception as e:
        ticket.fail(e)
        yield openai_error_event(e)
    yield sse.DONE


def _chat_prompt(service: Service, req: ChatRequest) -> tuple[Served, str, GenerateParameters]:
    served = _served(service, req.model)
    params = chat_parameters(req)
    return served, service.chat_prompt(req.messages, served), params


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**ERRORS, 200: {"content": SSE, "description": "An answer, or a stream"}},
)
async def chat_completions(req: ChatRequest, request: Request) -> Response:
    service = _service(request)
    ticket = begin(request)
    served, prompt, params = _chat_prompt(service, req)
    # The template already placed any special tokens (as TGI: add_special_tokens=false).
    prepared = await service.prepare(
        prompt,
        params,
        add_special_tokens=False,
        stream=req.stream,
        grammar=req.response_format,
        served=served,
    )
    meta = _meta(service, "chatcmpl", served.id)
    if req.stream:
        [stream] = service.submit(prepared)

        def closed() -> None:
            stream.cancel()
            ticket.settle(C.CANCELLED)

        headers = {
            "x-compute-type": service.loaded.device,
            "x-compute-characters": str(prepared.characters),
        }
        return sse.EventStream(chat_events(service, stream, meta, req, ticket), closed, headers)
    [end] = await service.complete(prepared, request, ticket)
    logprobs = ChatLogprobs(content=[_logprobs(t) for t in end.tokens]) if req.logprobs else None
    choice = ChatChoice(
        index=0,
        message=OutputMessage(content=end.generated_text),
        logprobs=logprobs,
        finish_reason=openai_finish_reason(end.finish_reason),
    )
    usage = _usage(end.input_length, end.generated_tokens)
    body = ChatCompletion(**meta, choices=[choice], usage=usage).model_dump()
    headers = timing_headers(ticket, end, prepared.characters, service.loaded.device)
    return JSONResponse(body, headers=headers)


async def chat_events(
    service: Service, stream: Any, meta: dict[str, Any], req: ChatRequest, ticket: Ticket
) -> AsyncIterator[str]:
    try:
        async for token, end in service.stream(stream, ticket):
            text = "" if token.special else token.text
            reason = openai_finish_reason(end.finish_reason) if end else None
            logprobs = ChatLogprobs(content=[_logprobs(token)]) if req.logprobs else None
            choice = ChatChunkChoice(
                index=0, delta=ChatDelta(content=text), logprobs=logprobs, finish_reason=reason
            )
            yield sse.event(ChatCompletionChunk(**meta, choices=[choice]))
            if end and req.stream_options and req.stream_options.include_usage:
                usage = _usage(end.input_length, end.generated_tokens)
                yield sse.event(ChatCompletionChunk(**meta, choices=[], usage=usage))
    except Exception as e:
        ticket.fail(e)
        yield openai_error_event(e)
    yield sse.DONE


@router.post("/chat_tokenize", response_model=ChatTokenizeResponse, responses=ERRORS)
async def chat_tokenize(req: ChatRequest, request: Request) -> dict[str, Any]:
    """TGI's /chat_tokenize: the templated prompt, and its tokens (no special tokens added)."""
    service = _service(request)
    served, prompt, _ = _chat_prompt(service, req)
    pieces = await service.tokenize(prompt, add_special_tokens=False, served=served)
    return {"tokenize_response": pieces, "templated_text": prompt}
