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
    url: str, api_key: str | None, inputs: str, max_new_tokens: int, timeout: float = 300
) -> dict[str, Any]:
    """``POST /generate``; the response body, or an `Exit` that says what went wrong."""
    if not url.startswith(("http://", "https://")):  # so urlopen never reads file: URLs
        raise Exit(f"--url {url!r}: the API is spoken over http:// or https:// only.")
    body = json.dumps({"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = f"{url}/generate"
    request = urllib.request.Request(endpoint, data=body.encode(), headers=headers)  # noqa: S310
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
