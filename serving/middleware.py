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
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or by counting."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than the {self.max_bytes}-byte limit"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, message, C.ERROR_VALIDATION)
        seen = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(send, 413, message, C.ERROR_VALIDATION)


class BearerAuth:
    """Require ``Authorization: Bearer <key>`` (TGI's way) everywhere but the open paths."""

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or scope["path"] in self.OPEN_PATHS
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
