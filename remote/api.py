"""Speak the TGI HTTP API (contract 3) from the operator's machine: what `fab prompt` uses.

Standard library only (``urllib``), so `fab prompt` works without httpx or requests.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from invoke import Exit


def generate(
    url: str,
    api_key: str | None,
    inputs: str,
    max_new_tokens: int,
    timeout: float = 300,
    model: str = "",
) -> dict[str, Any]:
    """``POST /generate`` (to served ``model``, by TGI's ``adapter_id``; "": the default one);
    the response body, or an `Exit` that says what went wrong."""
    parameters: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if model:
        parameters["adapter_id"] = model
    return _call(url, api_key, "/generate", {"inputs": inputs, "parameters": parameters}, timeout)


def served_models(url: str, api_key: str | None, timeout: float = 30) -> list[dict[str, Any]]:
    """``GET /v1/models``: the ids a server serves; the native server adds each one's
    ``prompt_format`` (null for a model that never learned one)."""
    return list(_call(url, api_key, "/v1/models", None, timeout).get("data") or [])


def _call(
    url: str, api_key: str | None, path: str, body: dict[str, Any] | None, timeout: float
) -> dict[str, Any]:
    """A POST with ``body`` (a GET without); the JSON answer, or an `Exit` saying what failed."""
    if not url.startswith(("http://", "https://")):  # so urlopen never reads file: URLs
        raise Exit(f"--url {url!r}: the API is spoken over http:// or https:// only.")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise Exit(_http_error(err)) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise Exit(
            f"cannot reach the API at {url} ({reason}). Is it served (`fab serve`)? If the API "
            "port is closed to you, run `fab tunnel` and pass --url http://127.0.0.1:PORT."
        ) from None


def _http_error(err: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(err.read()).get("error", "")
    except (ValueError, AttributeError):
        detail = ""
    if err.code == 401:
        return "the server refused the API key (401). Run `fab serve` again to re-share it."
    return f"the server answered {err.code}: {detail or err.reason}"
