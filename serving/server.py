"""The native server: text-generation-inference 3.3's HTTP API over a small CPU engine.

    python -m serving.server --model runs/my-finetune/model            # 127.0.0.1:8080
    python -m serving.server --model DIR --host 0.0.0.0 --api-key "$KEY" \
        --cors-origin null --quantize int8
    python -m serving.server --model base=runs/pre/model --model sft=runs/sft/model \
        --adapter lora=runs/lora/model          # several: pick with parameters.adapter_id
    curl -s localhost:8080/generate -H 'Content-Type: application/json' \
        -d '{"inputs": "Hello", "parameters": {"max_new_tokens": 20}}'

Routes are thin: parse with ``schema`` (strict JSON, ``strict_json``), hand to ``Service``, shape
the answer. TGI routes here; the OpenAI-compatible ``/v1`` routes and ``/chat_tokenize`` in
``openai_routes``. Every error — refused input, overload, a failed generation, a bug — comes back
as TGI's ``{"error": ..., "error_type": ...}`` with TGI's status code, and is counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from serving import catalog, memory, openapi, sse
from serving import constants as C
from serving.engine import Engine, Finished
from serving.middleware import BearerAuth, BodyLimit
from serving.model import LoadedModel, load_model
from serving.openai_routes import router as openai_router
from serving.replies import (
    ERRORS,
    SSE,
    TIMING_HEADERS,
    TGIRoute,
    answer_error,
    begin,
    error,
    error_body,
    finite,
    token_model,
)
from serving.schema import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    PrefillToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
)
from serving.service import (
    Service,
    Ticket,
    error_kind,
    timing_headers,
)
from serving.settings import Settings, from_args

log = logging.getLogger("serving.server")


def create_app(settings: Settings, loaded: LoadedModel | Sequence[LoadedModel]) -> FastAPI:
    """The ASGI app for ``loaded`` (one model, or several: the first is the server's own); the
    engine starts and stops with the app's lifespan."""
    models = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
    engine = Engine(models, max_batch_size=settings.max_batch_size, max_queued=settings.max_queued)
    service = Service(models, engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        for lm in models:
            log.info("serving %s on %s:%d", lm.describe(), settings.host, settings.port)
        try:
            yield
        finally:
            engine.close()
            service.close()

    app = FastAPI(
        title="tinycloud native TGI-compatible server",
        version=C.VERSION,
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the API is documented in docs/serving.md
        redoc_url=None,
    )
    app.router.route_class = TGIRoute
    app.state.service = service
    _install_error_handlers(app)
    _add_tgi_routes(app, service)
    app.include_router(openai_router)
    openapi.install(app, api_key=bool(settings.api_key))
    # Starlette wraps the last-added middleware outermost: CORS sees every answer (401 and 413
    # included, so a browser can read them), then the body limit, then auth.
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            # so a page can say how long to wait after a 429, and read TGI's timings
            expose_headers=["Retry-After", *TIMING_HEADERS],
            max_age=600,
        )
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Routes answer their own errors (replies.TGIRoute); these cover the rest: a bug outside a
    route, bodies FastAPI cannot read, and Starlette's 404/405."""

    @app.exception_handler(Exception)
    async def served(request: Request, exc: Exception) -> JSONResponse:
        return answer_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = describe_validation(exc)
        return error(status, message, C.ERROR_VALIDATION)

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = C.ERROR_NOT_FOUND if exc.status_code == 404 else C.ERROR_HTTP
        return error(exc.status_code, str(exc.detail), kind, **(exc.headers or {}))


def describe_validation(exc: RequestValidationError) -> tuple[int, str]:
    """axum's words for a body it cannot read: 400 for JSON it cannot parse, 422 for JSON of
    the wrong shape (one line: where, and what was wrong)."""
    parts = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            reason = e.get("ctx", {}).get("error", "parse error")
            return 400, f"Failed to parse the request body as JSON: {reason}"
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return 422, "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)


def _add_tgi_routes(app: FastAPI, service: Service) -> None:
    compute_type = service.loaded.device

    probe = {"response_class": Response, "responses": {503: {"model": ErrorResponse}}}

    @app.get("/health", **probe)
    async def health() -> Response:
        """200 once the model is loaded and the scheduler runs (no key needed)."""
        if not service.engine.alive:
            return error(503, "unhealthy", "healthcheck")
        return Response(status_code=200)

    app.add_api_route("/ping", health, methods=["GET"], **probe)
    app.add_api_route("/", health, methods=["GET"], **probe)

    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def tgi_openapi() -> dict[str, Any]:
        """Where TGI serves its OpenAPI document; the same as /openapi.json here."""
        return app.openapi()

    @app.get("/info", response_model=Info, responses=ERRORS)
    async def info() -> dict[str, Any]:
        return service.info().model_dump()

    @app.get("/metrics", response_class=Response, responses=ERRORS)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", response_model=list[SimpleToken], responses=ERRORS)
    async def tokenize(req: GenerateRequest) -> Response:
        """TGI's /tokenize: lets a client (the chat page) count a prompt's tokens exactly, with
        the tokenizer of the model ``parameters.adapter_id`` names."""
        served = service.pick(req.parameters.adapter_id)
        pieces = await service.tokenize(req.inputs, served=served)
        return JSONResponse(pieces)

    @app.post("/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(req: GenerateRequest, request: Request) -> Response:
        body, headers = await _generate(service, req, request, compute_type)
        return JSONResponse(body, headers=headers)

    @app.post(
        "/generate_stream",
        response_class=StreamingResponse,
        responses={**ERRORS, 200: {"content": SSE, "description": "One event per token"}},
    )
    async def generate_stream(req: GenerateRequest, request: Request) -> Response:
        return await _generate_stream(service, req, request, compute_type)

    @app.post(
        "/",
        responses={
            **ERRORS,
            200: {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/GenerateResponse"},
                        }
                    },
                    **SSE,
                },
                "description": "A list of one answer, or a stream",
            },
        },
    )
    async def compat(req: CompatGenerateRequest, request: Request) -> Response:
        """TGI's compat route: ``stream`` picks /generate_stream or /generate (as a list)."""
        if req.stream:
            return await _generate_stream(service, req, request, compute_type)
        body, headers = await _generate(service, req, request, compute_type)
        return JSONResponse([body], headers=headers)


async def _generate(
    service: Service, req: GenerateRequest, request: Request, compute_type: str
) -> tuple[dict[str, Any], dict[str, str]]:
    ticket = begin(request)
    prepared = await service.prepare(req.inputs, req.parameters)
    ends = await service.complete(prepared, request, ticket)
    # best_of: TGI keeps the sequence with the highest mean token log-probability
    best = max(range(len(ends)), key=lambda i: _rank(ends[i]))
    others = [e for i, e in enumerate(ends) if i != best]
    response = generate_response(req, ends[best], others if len(ends) > 1 else None)
    return response.wire(), timing_headers(ticket, ends[best], prepared.characters, compute_type)


def _rank(end: Finished) -> float:
    value = end.mean_logprob
    return value if math.isfinite(value) else -math.inf


async def _generate_stream(
    service: Service, req: GenerateRequest, request: Request, compute_type: str
) -> Response:
    ticket = begin(request)
    prepared = await service.prepare(req.inputs, req.parameters, stream=True)
    [stream] = service.submit(prepared)  # 429 here, before any byte of the stream is sent
    headers = {"x-compute-type": compute_type, "x-compute-characters": str(prepared.characters)}

    def closed() -> None:
        stream.cancel()  # no-ops once it finished and was counted
        ticket.settle(C.CANCELLED)

    return sse.EventStream(tgi_events(service, stream, req, ticket), closed, headers)


def _full_text(req: GenerateRequest, text: str) -> str:
    return req.inputs + text if req.parameters.return_full_text else text


def _details(end: Finished, *, prefill: bool) -> dict[str, Any]:
    tokens = [token_model(t) for t in end.tokens]
    top = (
        [[token_model(a) for a in t.top] for t in end.tokens]
        if any(t.top for t in end.tokens)
        else []
    )
    return {
        "finish_reason": end.finish_reason,
        "generated_tokens": end.generated_tokens,
        "seed": end.seed,
        "prefill": [PrefillToken(id=i, text=t, logprob=finite(lp)) for i, t, lp in end.prefill]
        if prefill
        else [],
        "tokens": tokens,
        "top_tokens": top,
    }


def generate_response(
    req: GenerateRequest, end: Finished, others: list[Finished] | None = None
) -> GenerateResponse:
    """TGI's answer: details when ``details`` or ``decoder_input_details`` was asked for."""
    p = req.parameters
    details = None
    if p.details or p.decoder_input_details:
        best_of = None
        if others is not None:
            best_of = [
                BestOfSequence(
                    generated_text=_full_text(req, o.generated_text),
                    **_details(o, prefill=p.decoder_input_details),
                )
                for o in others
            ]
        details = Details(
            **_details(end, prefill=p.decoder_input_details), best_of_sequences=best_of
        )
    return GenerateResponse(generated_text=_full_text(req, end.generated_text), details=details)


async def tgi_events(
    service: Service, stream: Any, req: GenerateRequest, ticket: Ticket
) -> AsyncIterator[str]:
    """TGI's SSE stream: one event per token (with its top_tokens when asked); the last adds
    generated_text (and details). A failure after the stream began is an error event."""
    index = 0
    try:
        async for token, end in service.stream(stream, ticket):
            index += 1
            top = [token_model(t) for t in token.top]
            event = StreamResponse(index=index, token=token_model(token), top_tokens=top)
            if end is not None:
                event.generated_text = _full_text(req, end.generated_text)
                if req.parameters.details:
                    event.details = StreamDetails(
                        finish_reason=end.finish_reason,
                        generated_tokens=end.generated_tokens,
                        seed=end.seed,
                        input_length=end.input_length,
                    )
            yield sse.event(event)
    except Exception as e:  # GenerationFailed, or a bug: the client still hears why
        ticket.fail(e)
        if error_kind(e) == C.ERROR_INTERNAL:
            log.exception("stream failed")
        yield sse.event(error_body(e)[1])


def check_memory(plan: catalog.Plan, settings: Settings) -> None:
    """Refuse the plan (``memory.PlanRefused``) if it cannot fit, before any weight is loaded;
    else log what it needs (``--plan`` prints it)."""
    slots, quantize = settings.max_batch_size, settings.quantize
    needs = plan.needs(slots, quantize)
    budget, source = memory.available(settings.device, settings.memory_limit_gb)
    int8 = plan.needs(slots, "int8") if settings.device == "cpu" else None
    memory.check(needs, budget, source, slots=slots, quantize=quantize, int8_needs=int8)
    lines = memory.describe(needs, slots)
    summary = (
        f"memory plan: {memory.mib(memory.total(needs))} with the runtime, "
        f"{memory.mib(budget)} available ({source})"
    )
    if settings.plan_only:
        head = f"serving {', '.join(plan.order)} (the first is the default)"
        print("\n".join([head, *lines, summary]))
    else:
        log.info("%s\n%s", summary, "\n".join(lines))


def configure_threads(threads: int | None) -> int:
    """Torch threads for the scheduler (its only torch user): one per usable core but one.

    The spare core is the event loop's (HTTP, SSE, JSON) and the tokenizer workers'. Measured
    on 2 cores, int8, over HTTP (bench/serve_throughput.py's requests, alternated, medians):
    1 thread 80 tok/s for one stream and 255 for 8 clients, 2 threads 72 and 228. Under load
    from other processes 2 threads collapse (OpenMP's workers wait at every op's barrier for
    a descheduled sibling: 13.6 against 20 ms a step, up to 10x worse), 1 thread degrades
    gently."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = threads or max(1, (cores or 1) - 1)
    torch.set_num_threads(n)
    return n


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    try:
        settings = from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for spec in settings.served:  # before torch is imported: a typo should not cost ten seconds
        if spec.source.startswith((".", "/", "~")) and not os.path.isdir(spec.source):
            print(
                f"error: could not load the model from {spec.source}: no such directory. "
                f"Pass --{spec.kind} runs/<run>/model (a save_pretrained directory).",
                file=sys.stderr,
            )
            return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s")
    try:
        plan = catalog.plan(list(settings.served), model_id=settings.model_id)
        check_memory(plan, settings)
    except memory.PlanRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if settings.plan_only:
        return 0
    configure_threads(settings.threads)
    try:
        if len(settings.served) == 1 and settings.served[0].kind == "model":
            loaded: Any = load_model(  # one model: exactly as before
                settings.model,
                quantize=settings.quantize,
                device=settings.device,
                slots=settings.max_batch_size,
                model_id=plan.order[0],
            )
        else:
            loaded = catalog.load(
                plan,
                quantize=settings.quantize,
                device=settings.device,
                slots=settings.max_batch_size,
            )
    except (OSError, ValueError) as e:
        print(f"error: could not load the models: {e}", file=sys.stderr)
        return 1
    app = create_app(settings, loaded)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
