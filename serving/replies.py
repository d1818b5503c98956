"""How every route answers: TGI's error bodies and status codes, the error answers the
OpenAPI document declares, log-probabilities as TGI writes them, and the ticket that counts a
request (service.py). Shared by ``server.py`` and ``openai_routes.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from serving import constants as C
from serving.engine import TokenOut
from serving.schema import ErrorResponse, Token
from serving.service import ClientLeft, Ticket, error_kind
from serving.strict_json import StrictJSONRoute

log = logging.getLogger("serving.replies")

# What each error body says before the message, as TGI's InferError displays it.
_PREFIX = {
    C.ERROR_VALIDATION: C.VALIDATION_PREFIX,
    C.ERROR_GENERATION: C.GENERATION_PREFIX,
    C.ERROR_TEMPLATE: C.TEMPLATE_PREFIX,
    C.ERROR_TOOL: "Tool error: ",
}
# The error answers every route documents in /openapi.json (the fuzz tests hold them to it).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in [
        (400, "The body is not valid JSON"),
        (401, "Missing or wrong API key"),
        (413, "The body is over the size limit"),
        (422, "Input validation error"),
        (424, "Generation error"),
        (429, "Model is overloaded"),
        (500, "A bug in this server"),
    ]
}
SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def error(status: int, message: str, error_type: str, **headers: str) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type).model_dump()
    named = {
        k.replace("_", "-").title(): v for k, v in headers.items()
    }  # retry_after -> Retry-After
    return JSONResponse(body, status_code=status, headers=named or None)


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    """TGI's status and body for an exception raised while serving a request."""
    kind = error_kind(exc)
    if kind == C.ERROR_INTERNAL:
        message = f"internal error ({type(exc).__name__}); the server log has the details"
    else:
        message = _PREFIX.get(kind, "") + str(exc)
    return C.STATUS[kind], {"error": message, "error_type": kind}


def finite(value: float | None) -> float | None:
    """A log-probability as TGI's serde writes an f32: NaN and infinities become null."""
    return value if value is not None and math.isfinite(value) else None


def token_model(t: TokenOut) -> Token:
    return Token(id=t.id, text=t.text, logprob=finite(t.logprob), special=t.special)


TIMING_HEADERS = [
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
]


def begin(request: Request) -> Ticket:
    """Count a generation request and keep its ticket where the error handlers find it."""
    ticket = request.app.state.service.ticket()
    request.state.ticket = ticket
    return ticket


def answer_error(request: Request, exc: BaseException) -> JSONResponse:
    """TGI's answer for an exception raised while serving ``request``, counted once."""
    ticket = getattr(request.state, "ticket", None)
    if ticket is not None:
        ticket.fail(exc)
    status, body = error_body(exc)
    if status == 500:
        log.error("request failed: %r", exc, exc_info=exc)
    headers = {"Retry-After": str(C.RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


class TGIRoute(StrictJSONRoute):
    """Every route: strict JSON in, and any exception out as TGI's JSON error. (Starlette's
    last-resort handler would answer too, but then re-raises, and uvicorn drops the
    connection.)"""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise  # the app's handlers answer these
            except ClientLeft:  # counted as cancelled; nobody reads this (nginx's 499)
                return Response(status_code=499)
            except Exception as exc:
                return answer_error(request, exc)

        return guarded
