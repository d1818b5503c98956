"""Pure ASGI middleware: body size limit (413) and bearer-token auth (401), in TGI's error shape.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streamed responses pass through untouched and a
client disconnect still reaches the route (which frees the request's slot).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from serving import constants as C

Scope = dict[str, Any]


async def send_error(send: Any, status: int, message: str, error_type: str, **headers: str):
    body = json.dumps({"error": message, "error_type": error_type}, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, sized or chunked alike.

    A body announced by Content-Length is refused before it is read. A chunked body (no
    Content-Length) is read here, up to the limit, and handed on whole: the route then never
    sees half a body, so an oversized one is a 413 too and not a parse error.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than the {self.max_bytes}-byte limit"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await send_error(send, 413, message, C.ERROR_VALIDATION)
            return await self.app(scope, receive, send)  # the server holds it to its length
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left while sending
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, 413, message, C.ERROR_VALIDATION)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices reach the route
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class BearerAuth:
    """Require ``Authorization: Bearer <key>`` (TGI's way) everywhere but the health probes
    (``GET /health``, ``/ping`` and ``/``, which TGI answers as health)."""

    OPEN = frozenset({("GET", "/health"), ("GET", "/ping"), ("GET", "/")})

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or (scope["method"], scope["path"]) in self.OPEN
        ):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        await send_error(
            send,
            401,
            "Unauthorized: send the API key as 'Authorization: Bearer <key>'",
            C.ERROR_AUTH,
            www_authenticate="Bearer",
        )
