"""Render the chat page: one self-contained HTML file bound to one inference server.

    from web.render import render_chat_page
    html = render_chat_page("http://ec2-1-2-3-4.compute-1.amazonaws.com:8080", api_key="...")

or from a shell: ``python -m web --url http://HOST:PORT [--api-key KEY] --out chat.html``.

The page is built from source files: ``chat.html.j2`` (the markup), ``chat/chat.css`` and the
scripts in ``chat/`` (listed in ``SCRIPTS``, in the order they run). Their text is inlined as it
is, so the result is one file that needs nothing else; the scripts are plain files that ESLint
checks and Node's test runner tests (tests/web/js/, run by tests/web/test_js.py).

Every value reaches the page through one JSON block (``|tojson`` escapes ``<``, ``>``, ``&`` and
``'``, so a ``</script>`` in a value cannot close it) or through HTML autoescaping; the page's
script reads the JSON block and never builds HTML from data. A Content-Security-Policy with a
fresh per-render nonce lets only the page's own script and style run and lets it talk only to
the server it was rendered for, so even a bug that leaked model text into markup could not run
it. Jinja2 and the standard library are all this needs: it runs on the operator's machine.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

TEMPLATE_NAME = "chat.html.j2"
SOURCE_DIR = Path(__file__).resolve().parent / "chat"
STYLE = "chat.css"
# The page's script, in the order it runs: each module hands its exports to the `tinycloud`
# namespace the template declares (under Node, to module.exports); app.js, last, wires the page.
SCRIPTS = (
    "sse.js",
    "api.js",
    "tokens.js",
    "prompt.js",
    "settings.js",
    "transcript.js",
    "columns.js",
    "comparison.js",
    "tokenview.js",
    "view.js",
    "markdown.js",
    "app.js",
)
# Text that would end the inline element early or switch the HTML parser into another state.
_CLOSERS = {"script": re.compile(r"</script|<!--", re.I), "style": re.compile(r"</style", re.I)}

# The fields of a prompt format (see remote/jobs/prompts.py, which owns the values). The page
# builds: system + separator + (user_prefix + user + user_suffix + reply + eos + separator)*
# + user_prefix + newest + user_suffix.
PROMPT_FORMAT_FIELDS = ("system", "separator", "user_prefix", "user_suffix", "eos", "stop")

_NETLOC = re.compile(r"^[A-Za-z0-9._~\-\[\]:]+$")  # host[:port]; nothing that could break CSP

_env = Environment(
    loader=FileSystemLoader(Path(__file__).resolve().parent),
    autoescape=True,  # every {{ }} in the template is HTML-escaped unless it goes through tojson
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


def inline_source(name: str, element: str) -> Markup:
    """A source file's text to inline as it is in a ``<script>`` or ``<style>`` element; refused
    if it holds what would close that element (a ``</script>`` in a string, say) — split such a
    string in the source (``"<" + "/script>"``)."""
    text = (SOURCE_DIR / name).read_text(encoding="utf-8")
    found = _CLOSERS[element].search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise ValueError(
            f"web/chat/{name}:{line} contains {found.group()!r}, which would end the page's "
            f"<{element}> element there; split the string in the source"
        )
    return Markup(text)  # noqa: S704 - our own source, checked above; not a value from outside


def normalize_url(url: str) -> str:
    """The server's base URL without a trailing slash; a clear error for anything the page's
    fetch() could not use (no scheme, credentials in the URL, a query string)."""
    raw = (url or "").strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = f"http://{raw}" if raw and "://" not in raw else "http://HOST:8080"
        raise ValueError(
            f"server URL {raw!r} is not an http(s) URL with a host. Pass it like {hint} "
            "(the API port of `fab serve` or `python -m serving.server`)"
        )
    if parts.username or parts.password:
        raise ValueError(
            "server URL must not carry a user name or password (browsers refuse such URLs in "
            "fetch). Pass the API key with --api-key instead"
        )
    if not _NETLOC.match(parts.netloc):
        raise ValueError(f"server URL {raw!r} has characters a host name cannot have")
    if parts.query or parts.fragment:
        raise ValueError(f"server URL {raw!r} must not have a query string or fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"server URL {raw!r} has a bad port: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def clean_prompt_format(prompt_format: dict[str, Any] | None) -> dict[str, str] | None:
    """Keep the known string fields of a prompt format; reject a value of the wrong type so a
    broken ``prompt_format.json`` fails at render time, not as garbled prompts in the browser."""
    if prompt_format is None:
        return None
    if not isinstance(prompt_format, dict):
        raise ValueError(
            f"prompt format must be a JSON object, got {type(prompt_format).__name__}. "
            "Use the model's prompt_format.json"
        )
    cleaned: dict[str, str] = {}
    for key in PROMPT_FORMAT_FIELDS:
        value = prompt_format.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(
                f"prompt format field {key!r} must be a string, got {type(value).__name__}"
            )
        cleaned[key] = value
    missing = [k for k in ("user_prefix", "user_suffix") if k not in cleaned]
    if missing:
        raise ValueError(
            f"prompt format lacks {', '.join(missing)}: without them the page cannot tell the "
            "model where a message starts and its answer begins"
        )
    return cleaned


def render_chat_page(
    url: str, api_key: str | None = None, prompt_format: dict[str, Any] | None = None
) -> str:
    """The chat page as one HTML string, bound to the server at ``url``.

    ``api_key`` (sent as ``Authorization: Bearer``) is written into the page, so the file is as
    secret as the key. ``prompt_format`` is the fallback when the server's ``/info`` has none.
    """
    base = normalize_url(url)
    parts = urlsplit(base)
    # CSP host sources cannot spell IPv6 literals; fall back to the scheme alone for those.
    connect = (
        f"{parts.scheme}:" if ":" in (parts.hostname or "") else f"{parts.scheme}://{parts.netloc}"
    )
    config = {
        "url": base,
        "api_key": api_key or None,
        "prompt_format": clean_prompt_format(prompt_format),
    }
    template = _env.get_template(TEMPLATE_NAME)
    return template.render(
        config=config,
        url=base,
        connect_src=connect,
        nonce=secrets.token_urlsafe(18),
        style=inline_source(STYLE, "style"),
        scripts=[(name, inline_source(name, "script")) for name in SCRIPTS],
    )
