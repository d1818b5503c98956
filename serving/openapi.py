"""The server's OpenAPI document (``GET /openapi.json``): FastAPI's, generated from
serving/schema.py, plus what FastAPI cannot infer — the shape of each server-sent event (so a
client, and the fuzz tests, can check every event of a stream) and the bearer auth when a key is
set. TGI serves its own document at ``/api-doc/openapi.json``; this one is the same API as this
server implements it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.middleware import BearerAuth
from serving.schema import ErrorResponse, OpenAIErrorEvent, StreamResponse

SSE_MEDIA = "text/event-stream"
REF = "#/components/schemas/{model}"


def _event(content_schema: dict[str, Any] | None) -> dict[str, Any]:
    """One SSE event: its ``data`` is JSON matching ``content_schema`` (or any text)."""
    data: dict[str, Any] = {"type": "string"}
    if content_schema is not None:
        data.update(contentMediaType="application/json", contentSchema=content_schema)
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _ref(model: type) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


# TGI's streams: a token event, or an error event once the stream began.
TGI_EVENT = _event({"oneOf": [_ref(StreamResponse), _ref(ErrorResponse)]})
# OpenAI's streams end with `data: [DONE]`, which is not JSON: the events are only text here.
OPENAI_EVENT = _event(None)


def install(app: FastAPI, *, api_key: bool) -> None:
    """Replace ``app.openapi`` with the completed document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (StreamResponse, ErrorResponse, OpenAIErrorEvent):
            found = model.model_json_schema(ref_template=REF)
            schemas.update(found.pop("$defs", {}))
            schemas[model.__name__] = found
        for path, operations in doc["paths"].items():
            for method, op in operations.items():
                content = op.get("responses", {}).get("200", {}).get("content", {})
                if SSE_MEDIA in content:
                    openai = path.startswith("/v1/")
                    content[SSE_MEDIA] = {"schema": OPENAI_EVENT if openai else TGI_EVENT}
                if api_key and (method.upper(), path) in BearerAuth.OPEN:
                    op["security"] = []  # the health probes answer without the key
        if api_key:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            doc["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
