"""Helpers for the serving tests: start real servers, parse SSE as a client does, build models.

Imported by the test modules in this folder (pytest puts the folder on sys.path); kept out of
a conftest.py so ``from conftest import ...`` elsewhere in the suite is never shadowed.
"""

from __future__ import annotations

import collections
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
from conftest import (  # noqa: F401  (re-exported for the serving tests)
    ROOT,
    start_subprocess_server,
    stop_subprocess_server,
    wait_for_health,
)


def drain(proc: subprocess.Popen, keep: int = 200) -> collections.deque[str]:
    """Read a server subprocess's output as it comes (its last ``keep`` lines are returned), so
    a busy server never blocks on a full pipe: thousands of access-log lines overflow one."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return tail


class ThreadServer:
    """A real uvicorn serving ``app`` on loopback from a thread of the test process, so a test
    can reach into the engine (its queue, its step hook) while clients talk HTTP to it."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def engine(self) -> Any:
        return self.app.state.service.engine

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_for_health(self.url, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.step_hook = None
        self.server.should_exit = True
        self.thread.join(10)


def sse_events(lines: Any) -> list[Any]:
    """Parse an SSE body the way a browser's EventSource does: ``data:`` lines, blank line ends
    an event; ``[DONE]`` is kept as the string."""
    events, data = [], []
    for line in lines:
        if line == "":
            if data:
                payload = "\n".join(data)
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        payload = "\n".join(data)
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_events(client: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list]:
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        assert r.headers["content-type"].startswith("text/event-stream")
        return r, sse_events(r.iter_lines())


def build_eos_model(src: Path, out: Path) -> Path:
    """A copy of the tiny model whose greedy choice is always EOS: the final layer norm outputs
    a constant aligned with a long EOS embedding, so EOS has the top logit at every step."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(src)
    eos = AutoTokenizer.from_pretrained(src).eos_token_id
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[eos] = wte[eos] / wte[eos].norm() * 10 * wte.norm(dim=1).max()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[eos] / wte[eos].norm())
    model.save_pretrained(out)
    return out
