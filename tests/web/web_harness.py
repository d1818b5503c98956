"""What the chat page's browser tests share: the real native server as a user starts it, real
headless Chromium (Debian's, driven by playwright), and a page rendered for the server and opened
from disk in a fresh browser context (so localStorage starts empty). Used by test_chat_page.py
(one model) and test_chat_compare.py (two runs served at once).

    from web_harness import browser_fixture, open_chat_fixture  # noqa: F401 (pytest fixtures)

Screenshots go to test-artifacts/web/ (git-ignored; CI keeps it as an artifact).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    free_port,
    start_subprocess_server,
    stop_subprocess_server,
)

from remote.jobs.prompts import PROMPT_FORMAT
from web.render import render_chat_page

API_KEY = 'key-with-"quotes"-</script>'
ARTIFACTS = ROOT / "test-artifacts" / "web"
XSS = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", '"><svg onload=alert(3)>']
FINISH_REASONS = {"length", "eos_token", "stop_sequence"}
# The tiny random model answers greedy requests with newlines only; sampling gives visible text.
SAMPLING = {"temperature": 1, "top_k": 0, "top_p": 1, "repetition_penalty": 1}


# --- the real server and the real browser -----------------------------------------------------


@contextlib.contextmanager
def running_server(model_dir: Path, *extra: str):
    """The real native server on a free port, one thread (the machine is shared)."""
    port = free_port()
    args = ["--model", str(model_dir), *extra, "--api-key", API_KEY, "--cors-origin", "null"]
    proc = start_subprocess_server(args, port, {"TINYCLOUD_API_KEY": ""})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_subprocess_server(proc)


def bucket(logprob: float | None) -> str:
    """The probability bucket the page colours a token by (web/chat/tokens.js BUCKETS)."""
    import math

    if logprob is None:
        return "none"
    p = math.exp(logprob)
    return str(next(i for i, floor in enumerate((0.9, 0.6, 0.3, 0.1, 0.0)) if p >= floor))


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module", name="browser")
def browser_fixture():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Chat:
    """A page opened from disk, with everything a test needs to watch it."""

    def __init__(self, browser, path: Path, viewport=None, **options):
        viewport = viewport or {"width": 1280, "height": 800}
        self.context = browser.new_context(viewport=viewport, **options)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list[dict] = []
        self.page.on("dialog", self._on_dialog)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", self._on_request)
        self.url = path.as_uri()
        self.page.goto(self.url)

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_request(self, request) -> None:
        if request.url.endswith("/generate_stream") and request.method == "POST":
            self.requests.append(json.loads(request.post_data))

    def wait_online(self) -> None:
        self.page.wait_for_selector('#health[data-state="up"]', timeout=10_000)
        named = "document.getElementById('model-name').textContent"
        self.wait(f"{named} !== 'unknown'")

    def wait(self, expression: str, timeout: float = 20_000) -> None:
        """Wait until a JS expression is true. Passed as a function, so the page's CSP (no eval)
        stays on in every test."""
        self.page.wait_for_function(f"() => {expression}", timeout=timeout)

    def set(self, **settings) -> None:
        for key, value in settings.items():
            self.page.fill(f"#set-{key}", str(value))

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_answer(self, n: int = 1) -> dict:
        """Wait for the n-th answer in the conversation to finish; its text and footer."""
        self.wait(
            f"document.querySelectorAll('#log .assistant')[{n - 1}]?.querySelector('.finish')"
            " && !document.querySelector('#log .streaming')"
        )
        return self.page.evaluate(
            """n => { const a = document.querySelectorAll('#log .assistant')[n - 1];
                      return { text: a.querySelector('.bubble').textContent,
                               finish: a.querySelector('.finish').textContent,
                               stats: a.querySelector('.stats').textContent }; }""",
            n,
        )

    def bubbles(self) -> list[str]:
        return self.page.eval_on_selector_all(".bubble", "els => els.map(e => e.textContent)")

    def close(self) -> None:
        self.context.close()


@pytest.fixture(name="open_chat")
def open_chat_fixture(browser, tmp_path):
    opened: list[Chat] = []

    def _open(
        url: str, api_key: str | None = API_KEY, viewport=None, name="chat.html", **options
    ) -> Chat:
        fmt = {**PROMPT_FORMAT, "eos": "<|endoftext|>"}
        path = tmp_path / name
        path.write_text(render_chat_page(url, api_key, fmt), encoding="utf-8")
        chat = Chat(browser, path, viewport, **options)
        opened.append(chat)
        return chat

    yield _open
    for chat in opened:
        assert chat.errors == [], chat.errors  # no uncaught script error in any test
        chat.close()


def expected_prompt(newest: str, system: str = PROMPT_FORMAT["system"]) -> str:
    f = PROMPT_FORMAT
    return system + f["separator"] + f["user_prefix"] + newest + f["user_suffix"]


def endless_message(base: str, model: str = "the random model") -> str:
    """A message the server's own model answers greedily, in the page's prompt and with its stop
    sequence, without ever ending: greedy output falls into a loop, and one whose loop holds
    neither EOS nor the stop sequence runs to max_new_tokens."""
    import httpx

    for message in ("Tell me a long story.", "hold", "wait", "the", "a b c", "zz"):
        params = {"max_new_tokens": 300, "do_sample": False, "repetition_penalty": 1,
                  "stop": [PROMPT_FORMAT["stop"]], "details": True}  # fmt: skip
        body = {"inputs": expected_prompt(message), "parameters": params}
        res = httpx.post(f"{base}/generate", json=body, headers=auth(), timeout=120)
        if res.json()["details"]["finish_reason"] == "length":
            return message
    pytest.fail(f"every message reached EOS on {model}: change its seed")
