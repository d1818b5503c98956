"""Server-sent events as TGI and OpenAI clients read them: ``data: <json>`` + blank line.

``EventStream`` is a StreamingResponse that always runs its ``on_close`` when the response
ends, however it ends: a client that leaves before the first event (when the event generator
has not even started, so its own ``finally`` never runs) still frees its slot and is counted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
DONE = "data: [DONE]\n\n"  # the OpenAI routes' last event


def event(payload: dict[str, Any] | Any) -> str:
    """One event: a dict, or a pydantic model through its ``wire()`` (TGI's field rules)."""
    if hasattr(payload, "wire"):
        payload = payload.wire()
    elif hasattr(payload, "model_dump"):
        payload = payload.model_dump()
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


class EventStream(StreamingResponse):
    def __init__(
        self,
        events: AsyncIterator[str],
        on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={**HEADERS, **(headers or {})}
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
