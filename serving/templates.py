"""Render ``launch_gpt2.sh`` (TGI in Docker) and ``prompt.sh`` from their Jinja2 templates.

Every value reaches the script through the ``sh`` filter (``shlex.quote``); rendering fails if
a template ever prints a value without it, so nothing unquoted can slip into a script.

    from serving.templates import render_launch_script, render_prompt_script, token_limits
    max_in, max_total = token_limits(1024)
    script = render_launch_script(model_dir="/home/ubuntu/runs/ft/model", api_port=8080,
        api_key=key, gpu=False, max_input_tokens=max_in, max_total_tokens=max_total,
        cors_origins=["null"])
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2

from serving import constants as C

TEMPLATE_DIR = Path(__file__).resolve().parent
_CONTAINER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # Docker's own rule
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DEFAULT_PROMPT_MAX_NEW_TOKENS = 100


class Quoted(str):
    """A value already quoted for the shell; the only thing templates may print."""


def shell_quote(value: object) -> Quoted:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return Quoted(shlex.quote(str(value)))


def _only_quoted(value: object) -> object:
    if isinstance(value, Quoted):
        return value
    raise ValueError(f"template printed {value!r} without the |sh filter")


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    autoescape=False,  # noqa: S701 (shell, not HTML: the sh filter is the escaping)
    keep_trailing_newline=True,
    finalize=_only_quoted,
)
_env.filters["sh"] = shell_quote


def token_limits(n_positions: int) -> tuple[int, int]:
    """TGI's --max-input-tokens / --max-total-tokens for a model with ``n_positions``:
    the whole context in total, and at least one token left to generate."""
    if n_positions < 2:
        raise ValueError(f"n_positions must be >= 2, got {n_positions}")
    return n_positions - 1, n_positions


def _check_text(name: str, value: str) -> str:
    if not value or _CONTROL.search(value):
        raise ValueError(f"{name} must be non-empty text without control characters: {value!r}")
    return value


def render_launch_script(
    *,
    model_dir: str,
    api_port: int,
    api_key: str | None,
    gpu: bool,
    max_input_tokens: int,
    max_total_tokens: int,
    cors_origins: list[str],
    image: str = C.DEFAULT_IMAGE,
    container_name: str = C.DEFAULT_CONTAINER_NAME,
    data_dir: str | None = None,
    cpus: int | str = "max",
    health_timeout: int = C.TGI_HEALTH_TIMEOUT_S,
) -> str:
    """``launch_gpt2.sh``: start TGI on ``api_port`` serving ``model_dir`` (mounted at /model)
    and wait for /health. ``data_dir`` (TGI's /data) defaults to ``$HOME/tgi-data`` on the
    host; ``cpus="max"`` means all of the host's cores, counted when the script runs."""
    if not 1 <= api_port <= 65535:
        raise ValueError(f"api_port must be 1-65535, got {api_port}")
    if not 0 < max_input_tokens < max_total_tokens:
        raise ValueError(
            f"need 0 < max_input_tokens < max_total_tokens (TGI refuses otherwise); got "
            f"{max_input_tokens} and {max_total_tokens}. Use token_limits(n_positions)."
        )
    if not _CONTAINER_NAME.match(container_name):
        raise ValueError(f"container_name {container_name!r} is not a valid Docker name")
    if "*" in cors_origins and api_key:
        raise ValueError("CORS origin '*' with an API key would expose the key; name origins.")
    if not (cpus == "max" or (isinstance(cpus, int) and cpus > 0)):
        raise ValueError(f"cpus must be a positive int or 'max', got {cpus!r}")
    for name, value in [("model_dir", model_dir), ("image", image), ("data_dir", data_dir)]:
        if value is not None:
            _check_text(name, value)
    for origin in cors_origins:
        _check_text("cors origin", origin)
    if api_key is not None:
        _check_text("api_key", api_key)
    return _env.get_template("launch_gpt2.sh.j2").render(
        model_dir=model_dir,
        data_dir=data_dir,
        api_port=int(api_port),
        image=image,
        container_name=container_name,
        max_input_tokens=int(max_input_tokens),
        max_total_tokens=int(max_total_tokens),
        cpus=cpus,
        health_timeout=int(health_timeout),
        cors_origins=list(cors_origins),
        api_key=api_key or "",
        gpu=bool(gpu),
    )


# The fields of a prompt format prompt.sh uses (remote/jobs/prompts.py writes them all).
PROMPT_FORMAT_FIELDS = ("system", "separator", "user_prefix", "user_suffix")


def prompt_format_json(prompt_format: dict[str, Any] | None) -> str:
    """The prompt format as one line of JSON for the script, or "" for none; a format that
    lacks what the script needs is refused here, not discovered as a garbled prompt later."""
    if prompt_format is None:
        return ""
    if not isinstance(prompt_format, dict):
        raise ValueError(f"prompt_format must be a dict, got {type(prompt_format).__name__}")
    fields = {k: prompt_format.get(k, "") for k in PROMPT_FORMAT_FIELDS}
    bad = [k for k, v in fields.items() if not isinstance(v, str)]
    if bad or not (fields["user_prefix"] or fields["user_suffix"]):
        raise ValueError(
            f"prompt_format needs string fields {', '.join(PROMPT_FORMAT_FIELDS)} (user_prefix "
            f"and user_suffix at least); got {prompt_format!r}. Use the model's prompt_format.json."
        )
    return json.dumps(fields, ensure_ascii=True)


def render_prompt_script(
    *, url: str, api_key: str | None, prompt_format: dict[str, Any] | None = None
) -> str:
    """``prompt.sh [--raw] "<prompt>" [max_new_tokens]`` against the server at ``url``.

    With ``prompt_format`` (the served model's ``prompt_format.json``) the prompt is wrapped in
    it, as `fab prompt` and the chat page do; ``--raw`` sends it as typed. Without one, always
    as typed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must look like http://HOST:PORT, got {url!r}")
    _check_text("url", url)
    if api_key is not None:
        _check_text("api_key", api_key)
    return _env.get_template("prompt.sh.j2").render(
        url=url.rstrip("/"),
        api_key=api_key or "",
        default_max_new_tokens=DEFAULT_PROMPT_MAX_NEW_TOKENS,
        prompt_format=prompt_format_json(prompt_format),
    )
