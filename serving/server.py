"""The native server: text-generation-inference's HTTP API over a small CPU engine.

    python -m serving.server --model runs/my-finetune/model            # 127.0.0.1:8080
    python -m serving.server --model DIR --host 0.0.0.0 --api-key "$KEY" \
        --cors-origin null --quantize int8
    curl -s localhost:8080/generate -H 'Content-Type: application/json' \
        -d '{"inputs": "Hello", "parameters": {"max_new_tokens": 20}}'

Routes are thin: parse with ``schema``, hand to ``Service``, shape the answer. TGI routes here;
the OpenAI-compatible ``/v1`` routes in ``openai_routes``. Errors always come back as TGI's
``{"error": ..., "error_type": ...}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from serving import constants as C
from serving import sse
from serving.engine import Engine, Finished, GenerationFailed, Overloaded, TokenOut
from serving.middleware import BearerAuth, BodyLimit
from serving.model import LoadedModel, load_model
from serving.openai_routes import router as openai_router
from serving.schema import (
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeRequest,
)
from serving.service import Service, TemplateError
from serving.settings import Settings, from_args
from serving.validation import ValidationError

log = logging.getLogger("serving.server")


def error(status: int, message: str, error_type: str, **headers: str) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type).model_dump()
    named = {
        k.replace("_", "-").title(): v for k, v in headers.items()
    }  # retry_after -> Retry-After
    return JSONResponse(body, status_code=status, headers=named or None)


def token_model(t: TokenOut) -> Token:
    return Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def create_app(settings: Settings, loaded: LoadedModel) -> FastAPI:
    """The ASGI app for ``loaded``; the engine starts and stops with the app's lifespan."""
    engine = Engine(loaded, max_batch_size=settings.max_batch_size, max_queued=settings.max_queued)
    service = Service(loaded, engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        log.info("serving %s on %s:%d", loaded.describe(), settings.host, settings.port)
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(
        title="tinycloud native TGI-compatible server",
        version=C.VERSION,
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the API is documented in docs/serving.md
        redoc_url=None,
    )
    app.state.service = service
    _install_error_handlers(app)
    _add_tgi_routes(app, service)
    app.include_router(openai_router)
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
            expose_headers=["Retry-After"],  # so a page can say how long to wait after a 429
            max_age=600,
        )
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, describe_validation(exc), C.ERROR_VALIDATION)

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return error(422, str(exc), C.ERROR_VALIDATION)

    @app.exception_handler(TemplateError)
    async def template(_: Request, exc: TemplateError) -> JSONResponse:
        return error(422, str(exc), C.ERROR_TEMPLATE)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return error(429, str(exc), C.ERROR_OVERLOADED, retry_after=str(C.RETRY_AFTER_S))

    @app.exception_handler(GenerationFailed)
    async def failed(_: Request, exc: GenerationFailed) -> JSONResponse:
        return error(500, f"generation failed: {exc}", C.ERROR_GENERATION)

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = C.ERROR_NOT_FOUND if exc.status_code == 404 else C.ERROR_HTTP
        return error(exc.status_code, str(exc.detail), kind, **(exc.headers or {}))


def describe_validation(exc: RequestValidationError) -> str:
    """One line in the spirit of TGI's serde message: where, and what was wrong."""
    parts = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON: {e.get('ctx', {}).get('error', 'parse error')}"
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)


def _add_tgi_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return service.info().model_dump(exclude_none=False)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> list[dict[str, Any]]:
        """TGI's /tokenize: lets a client (the chat page) count a prompt's tokens exactly."""
        if not req.inputs:
            raise ValidationError("`inputs` cannot be empty")
        enc = service.loaded.tokenizer(req.inputs, return_offsets_mapping=True)
        return [
            {"id": i, "text": req.inputs[a:b], "start": a, "stop": b}
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> dict[str, Any]:
        spec = service.prepare(req.inputs, req.parameters)
        end = await service.complete(spec, request)
        return generate_response(req, end).wire()

    @app.post("/generate_stream")
    async def generate_stream(req: GenerateRequest) -> StreamingResponse:
        spec = service.prepare(req.inputs, req.parameters)
        stream = service.submit(spec)  # 429 here, before any byte of the stream is sent
        return StreamingResponse(
            tgi_events(service, stream, req), media_type="text/event-stream", headers=sse.HEADERS
        )

    @app.post("/")
    async def compat(req: GenerateRequest, request: Request) -> Any:
        """TGI's compat route: ``stream`` picks /generate_stream or /generate (as a list)."""
        if req.stream:
            return await generate_stream(req)
        return [await generate(req, request)]


def generate_response(req: GenerateRequest, end: Finished) -> GenerateResponse:
    text = req.inputs + end.generated_text if req.parameters.return_full_text else None
    details = None
    if req.parameters.details:
        details = Details(
            finish_reason=end.finish_reason,
            generated_tokens=end.generated_tokens,
            seed=end.seed,
            prefill=[PrefillToken(id=i, text=t, logprob=lp) for i, t, lp in end.prefill],
            tokens=[token_model(t) for t in end.tokens],
        )
    return GenerateResponse(generated_text=text or end.generated_text, details=details)


async def tgi_events(service: Service, stream: Any, req: GenerateRequest) -> AsyncIterator[str]:
    """TGI's SSE stream: one event per token; the last adds generated_text (and details)."""
    index = 0
    try:
        async for token, end in service.stream(stream):
            index += 1
            event = StreamResponse(index=index, token=token_model(token))
            if end is not None:
                full = req.parameters.return_full_text
                event.generated_text = (req.inputs if full else "") + end.generated_text
                if req.parameters.details:
                    event.details = StreamDetails(
                        finish_reason=end.finish_reason,
                        generated_tokens=end.generated_tokens,
                        seed=end.seed,
                        input_length=end.input_length,
                    )
            yield sse.event(event)
    except GenerationFailed as e:
        yield sse.error_event(e)


def configure_threads(threads: int | None) -> int:
    """One torch thread per usable core by default: the scheduler is the only torch user."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = threads or cores or 1
    torch.set_num_threads(n)
    return n


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    try:
        settings = from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if settings.model.startswith((".", "/", "~")) and not os.path.isdir(settings.model):
        print(  # before torch is imported: a typo should not cost ten seconds
            f"error: could not load the model from {settings.model}: no such directory. "
            "Pass --model runs/<run>/model (a save_pretrained directory).",
            file=sys.stderr,
        )
        return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s")
    configure_threads(settings.threads)
    try:
        loaded = load_model(
            settings.model,
            quantize=settings.quantize,
            device=settings.device,
            slots=settings.max_batch_size,
            model_id=settings.model_id,
        )
    except (OSError, ValueError) as e:
        print(f"error: could not load the model from {settings.model}: {e}", file=sys.stderr)
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
