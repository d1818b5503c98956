"""Server-sent events as TGI and OpenAI clients read them: ``data: <json>`` + blank line."""

from __future__ import annotations

import json
from typing import Any

from serving import constants as C

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
DONE = "data: [DONE]\n\n"  # the OpenAI routes' last event


def event(payload: dict[str, Any] | Any) -> str:
    """One event; pydantic models are dumped as they are (None fields kept, as TGI does)."""
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_event(exc: BaseException) -> str:
    """TGI reports a failure after the stream began as an event with its error body."""
    return event({"error": f"generation failed: {exc}", "error_type": C.ERROR_GENERATION})
