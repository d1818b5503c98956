"""Render ``prompt.sh``, the chat page and ``launch_gpt2.sh`` for one stack, on this machine.

    rendered/<stack>/prompt.sh     ./prompt.sh "Name three colors." 50
    rendered/<stack>/chat.html     open it in a browser (`fab chat` does)

The templates belong to ``serving/`` and ``web/``; this module only fills them with the stack's
URL and API key. The rendered files hold the key, so they are written 0700/0600 into the
git-ignored ``rendered/`` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from remote import paths
from remote.target import Target, write_secret


def default_prompt_format() -> dict[str, Any]:
    """The project's prompt format (remote/jobs/prompts.py) with GPT-2's end-of-text token."""
    from remote.jobs.prompts import PROMPT_FORMAT
    from remote.jobs.tokenizer import EOS

    return {**PROMPT_FORMAT, "eos": EOS}


def out_dir(target: Target) -> Path:
    return paths.rendered_dir() / target.state_dir.name


def render_prompt_script(
    target: Target, url: str, api_key: str, prompt_format: dict[str, Any] | None = None
) -> Path:
    """prompt.sh, wrapping prompts in ``prompt_format`` (the served model's) unless --raw."""
    from serving.templates import render_prompt_script as render

    text = render(url=url, api_key=api_key, prompt_format=prompt_format)
    path = write_secret(out_dir(target) / "prompt.sh", text)
    path.chmod(0o700)
    return path


def render_chat_page(
    target: Target, url: str, api_key: str, prompt_format: dict[str, Any] | None = None
) -> Path:
    from web.render import render_chat_page as render

    html = render(url, api_key=api_key, prompt_format=prompt_format or default_prompt_format())
    return write_secret(out_dir(target) / "chat.html", html)


def render_launch_script(
    *, model_dir: str, api_port: int, api_key: str, gpu: bool, n_positions: int = 1024
) -> str:
    """``launch_gpt2.sh`` for TGI, limits taken from the model's context length."""
    from serving.templates import render_launch_script as render
    from serving.templates import token_limits

    max_input, max_total = token_limits(n_positions)
    return render(
        model_dir=model_dir,
        api_port=api_port,
        api_key=api_key,
        gpu=gpu,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        cors_origins=["null"],
    )  # "null": the chat page opened from disk
