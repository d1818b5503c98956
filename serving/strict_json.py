"""Request bodies read as TGI reads them: strict JSON, or a 400 in TGI's error shape.

Python's ``json`` accepts what TGI's serde_json refuses — ``NaN`` and ``Infinity``, lone UTF-16
surrogates (``"\\ud800"``), bytes that are not UTF-8, nesting thousands deep — and each of those
reached a part of the server that could not take it (the sampler, the Rust tokenizer: a
plain-text 500). Every route reads its body through ``StrictJSONRoute`` instead, so they are
refused at the door as a body that is not valid JSON (400, ``error_type: validation``; TGI's
axum answers a JSON syntax error with 400 too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise json.JSONDecodeError(f"number out of range: {text[:40]}", text, 0)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    """True if any string (or key) in ``value`` cannot be written as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def strict_loads(body: bytes) -> Any:
    """``json.loads`` with serde_json's refusals, each raised as ``JSONDecodeError``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({e.reason})", "", e.start) from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise json.JSONDecodeError("the JSON is nested too deeply", text, 0) from None
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(value):
        raise json.JSONDecodeError("a string holds a lone UTF-16 surrogate", text, 0)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose handler sees a ``StrictJSONRequest`` (FastAPI's custom-route hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
