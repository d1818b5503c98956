"""A stand-in for the server issue 17 asks for, built from the real one: several runs served at
once, picked per request with TGI's ``parameters.adapter_id``, answering ``top_n_tokens``. The
chat page's compare and token-view tests (tests/web/test_chat_compare_standin.py) run against it
until the native server does both; then they switch to the real server and this file goes.

Every answer comes from a real native server process per run, started as a user starts it
(``python -m serving.server``, with the API key and CORS of the other browser tests). This only
routes between them and adds, in TGI 3.3's shapes, what they do not have yet:

- ``GET /v1/models`` lists every run (TGI's entry: id, object, created, owned_by); ``/info``,
  ``/health`` and everything without ``adapter_id`` go to the first run, the server's own.
- ``parameters.adapter_id`` names the run a request goes to, and is taken out before it is
  forwarded; an id that is not served gets a 422 in TGI's error shape.
- ``parameters.top_n_tokens`` on ``/generate_stream`` is checked as TGI checks it (at most
  ``MAX_TOP_N_TOKENS``), taken out before forwarding, and each event of the real stream gets
  ``top_tokens``: the n most likely tokens of the distribution the server drew that token from,
  computed with transformers from the same weights, fed the tokens the server chose. The
  server's own logprob of each chosen token must match that distribution (to ``LOGPROB_TOLERANCE``)
  or the stream ends with an error event: the alternatives shown are the model's, never made up.
  Only distributions this reproduces exactly are taken (greedy, or sampling with a temperature
  and no top-k, top-p, typical-p or penalty); any other request with top_n_tokens gets a 422
  that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

MAX_TOP_N_TOKENS = 5  # TGI's --max-top-n-tokens default
LOGPROB_TOLERANCE = 1e-3  # the native decoder matches transformers to ~1e-6 in fp32
_REQUEST_HEADERS = ("authorization", "origin", "content-type", "accept")
_PREFLIGHT_HEADERS = ("access-control-request-method", "access-control-request-headers")
_RESPONSE_HEADERS = ("content-type", "retry-after", "vary", "cache-control")


def tgi_error(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": message, "error_type": "validation"}).encode()
    return status, {"content-type": "application/json"}, body


class Replay:
    """The distributions one run drew a stream's tokens from: its weights, fed the prompt and
    then each token the server chose."""

    def __init__(self, model: Any, tokenizer: Any, temperature: float, n: int, inputs: str) -> None:
        import torch

        self.model, self.tokenizer, self.temperature, self.n = model, tokenizer, temperature, n
        self.special = set(tokenizer.all_special_ids)
        ids = tokenizer(inputs)["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
        self.past, self.logits = out.past_key_values, out.logits[0, -1]

    def top_tokens(self, chosen: int, logprob: float) -> list[dict[str, Any]]:
        """TGI's ``top_tokens`` for the step that chose ``chosen``; then feeds it."""
        import torch

        logprobs = torch.log_softmax(self.logits / self.temperature, dim=-1)
        if abs(float(logprobs[chosen]) - logprob) > LOGPROB_TOLERANCE:
            raise ValueError(
                f"the server gave token {chosen} logprob {logprob}, the replay "
                f"{float(logprobs[chosen]):.6f}: the stand-in cannot vouch for alternatives"
            )
        values, ids = torch.topk(logprobs, self.n)
        top = [
            {
                "id": int(i),
                "text": self.tokenizer.decode([int(i)]),
                "logprob": float(v),
                "special": int(i) in self.special,
            }
            for v, i in zip(values, ids, strict=True)
        ]
        with torch.no_grad():
            out = self.model(torch.tensor([[chosen]]), past_key_values=self.past, use_cache=True)
        self.past, self.logits = out.past_key_values, out.logits[0, -1]
        return top


def replayable_temperature(p: dict[str, Any]) -> float | None:
    """The temperature of a distribution Replay reproduces exactly, or None."""
    if any(p.get(k) is not None for k in ("top_k", "top_p", "typical_p", "grammar")):
        return None
    if p.get("repetition_penalty") not in (None, 1, 1.0):
        return None
    if p.get("frequency_penalty") not in (None, 0, 0.0):
        return None
    temperature = p.get("temperature")
    return 1.0 if temperature is None else float(temperature)


class StandIn:
    """The router. ``runs``: model id -> (base URL of its real server, its model directory),
    the server's own model first."""

    def __init__(self, runs: dict[str, tuple[str, Path]]) -> None:
        from transformers import AutoTokenizer, GPT2LMHeadModel

        self.runs = runs
        self.own = next(iter(runs))
        self.models = {
            mid: (GPT2LMHeadModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d))
            for mid, (_, d) in runs.items()
        }
        self.replays = 0  # streams given top_tokens: the tests check the stand-in was used

    # -- the ASGI app ---------------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, out_headers, content = await self.handle(
            scope["method"], scope["path"], headers, body
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in out_headers.items()],
            }
        )
        if isinstance(content, bytes):
            await send({"type": "http.response.body", "body": content})
            return
        # A client that goes (the page's Stop) ends the stream here, and so the real server's.
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            async for chunk in content:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            await content.aclose()

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes):
        forwarded = {k: v for k, v in headers.items() if k in _REQUEST_HEADERS + _PREFLIGHT_HEADERS}
        if method == "GET" and path == "/v1/models":
            return await self.models_list(forwarded)
        target, payload = self.own, None
        if method == "POST" and body:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
        params = payload.get("parameters") if isinstance(payload, dict) else None
        top_n = 0
        if isinstance(params, dict):
            adapter = params.pop("adapter_id", None)
            if adapter is not None:
                if adapter not in self.runs:
                    served = ", ".join(self.runs)
                    return tgi_error(422, f"adapter_id `{adapter}` is not served here ({served})")
                target = adapter
            top_n = params.pop("top_n_tokens", None) or 0
            if top_n:
                refused = self.check_top_n(path, top_n, params)
                if refused:
                    return refused
            body = json.dumps(payload).encode()
        return await self.forward(method, path, forwarded, body, target, payload, top_n)

    def check_top_n(self, path: str, n: Any, params: dict[str, Any]):
        if not isinstance(n, int) or n < 0 or n > MAX_TOP_N_TOKENS:
            limit = f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {n}"
            return tgi_error(422, limit)
        if path != "/generate_stream" or replayable_temperature(params) is None:
            return tgi_error(
                422,
                "the test stand-in gives top_n_tokens on /generate_stream only, for greedy "
                "requests or sampling with a temperature alone (tests/web/standin.py)",
            )
        return None

    async def models_list(self, headers: dict[str, str]):
        status, out, content = await self.forward("GET", "/v1/models", headers, b"", self.own)
        if status != 200:
            return status, out, content
        listed = json.loads(content)
        listed["data"] = [{**listed["data"][0], "id": mid} for mid in self.runs]
        return 200, out, json.dumps(listed).encode()

    async def forward(self, method, path, headers, body, target, payload=None, top_n=0):
        url = self.runs[target][0] + path
        client = httpx.AsyncClient(timeout=None)  # one per request: it lives in uvicorn's loop
        request = client.build_request(method, url, headers=headers, content=body)
        response = await client.send(request, stream=True)
        out = {
            k: v
            for k, v in response.headers.items()
            if k.lower() in _RESPONSE_HEADERS or k.lower().startswith("access-control-")
        }
        if not (top_n and response.status_code == 200):
            content = await response.aread()
            await response.aclose()
            await client.aclose()
            return response.status_code, out, content
        temperature = replayable_temperature(payload["parameters"]) or 1.0
        model, tokenizer = self.models[target]
        replay = Replay(model, tokenizer, temperature, top_n, payload["inputs"])
        self.replays += 1
        return 200, out, self.with_top_tokens(client, response, replay)

    async def with_top_tokens(
        self, client: httpx.AsyncClient, response: httpx.Response, replay: Replay
    ) -> AsyncIterator[bytes]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "token" in event:
                    token = event["token"]
                    try:  # off the event loop: the other runs' requests go on meanwhile
                        event["top_tokens"] = await asyncio.to_thread(
                            replay.top_tokens, token["id"], token["logprob"]
                        )
                    except ValueError as e:
                        event = {"error": str(e), "error_type": "generation"}
                yield f"data:{json.dumps(event)}\n\n".encode()
                if "error" in event:
                    return
        finally:
            await response.aclose()
            await client.aclose()


@contextlib.contextmanager
def serving(runs: dict[str, tuple[str, Path]], port: int) -> Iterator[StandIn]:
    """The stand-in on ``port`` (uvicorn in a thread of the test process) while the block runs."""
    import uvicorn

    app = StandIn(runs)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the stand-in did not start")
            threading.Event().wait(0.05)
        yield app
    finally:
        server.should_exit = True
        thread.join(10)
