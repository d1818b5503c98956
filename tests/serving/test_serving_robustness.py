"""No request can hurt another: what a hostile client found, and the class behind each.

1. A sequence that fails (here: a model whose position 200 is NaN, so any sequence that reaches
   it has non-finite logits) ends alone with TGI's generation error; the batch decodes on.
   Every numeric parameter is read as TGI's f32/u32/u64 (1e-300 underflows to 0 and is refused
   as TGI refuses it; NaN, infinity and overflow never reach the sampler).
2. Nothing slow or large runs on the event loop: /health stays quick while megabyte inputs are
   refused (by size, before tokenizing) or tokenized (in a worker); /tokenize does not answer
   megabytes.
3. Every unexpected input or exception reaches the client in TGI's JSON shape and is counted.
4. An oversized chunked body is a 413 like a sized one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest
from conftest import wait_until
from serving_helpers import ThreadServer, stream_events

from serving import constants as C
from serving.model import load_model
from serving.server import create_app
from serving.settings import Settings

POISONED_POSITION = 200


def metric(client: httpx.Client, name: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or (
            line.startswith(name + "{") and line.split(" ")[0] == name
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from conftest import free_port

    settings = Settings(model=str(tiny_model_dir), threads=1)
    with ThreadServer(create_app(settings, load_model(settings.model)), free_port()) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def generate(client, inputs="The quick brown fox", **parameters) -> httpx.Response:
    return client.post("/generate", json={"inputs": inputs, "parameters": parameters})


def tgi_error(r: httpx.Response, status: int, message: str, kind: str = "validation") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == kind
    assert message in body["error"], body["error"]


# --- 1. one failing sequence ends alone -----------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tiny_model_dir, tmp_path_factory):
    """The tiny model with position 200's embedding NaN: a real failure inside one sequence."""
    import torch
    from conftest import free_port
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("poisoned") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.transformer.wpe.weight[POISONED_POSITION] = float("nan")
    model.save_pretrained(out)
    settings = Settings(model=str(out), threads=1)
    with ThreadServer(create_app(settings, load_model(str(out))), free_port()) as srv:
        yield srv


def prompt_of(srv: ThreadServer, n: int) -> str:
    """A prompt of exactly ``n`` tokens for the served model."""
    tok = srv.app.state.service.loaded.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. " * n)["input_ids"][:n]
    text = tok.decode(ids)
    assert len(tok(text)["input_ids"]) >= n - 2
    return text


def test_a_failing_sequence_ends_alone_and_the_batch_decodes_on(poisoned):
    srv, engine = poisoned, poisoned.engine
    short = [f"request {i} says" for i in range(3)]
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        alone = [generate(c, p, max_new_tokens=20).json()["generated_text"] for p in short]
        failures_before = metric(c, 'tgi_request_failure_total{err="generation"}')
    long_prompt = prompt_of(srv, POISONED_POSITION + 10)  # its prefill reaches position 200
    gate = threading.Event()
    engine.step_hook = gate.wait  # hold the scheduler until all five are queued: one batch

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
            body = lambda p, n: {"inputs": p, "parameters": {"max_new_tokens": n}}  # noqa: E731
            long = asyncio.ensure_future(ac.post("/generate", json=body(long_prompt, 20)))
            shorts = [asyncio.ensure_future(ac.post("/generate", json=body(p, 20))) for p in short]

            async def runaway():  # a stream that decodes past position 200 and fails there
                events = []
                async with ac.stream("POST", "/generate_stream", json=body("Hi", 240)) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            events.append(json.loads(line[5:]))
                return r.status_code, events

            stream = asyncio.ensure_future(runaway())
            assert await asyncio.to_thread(wait_until, lambda: engine.in_flight == 5)
            gate.set()
            return await long, await asyncio.gather(*shorts), await stream

    try:
        long, shorts, (status, events) = asyncio.run(scenario())
    finally:
        gate.set()
        engine.step_hook = None
    tgi_error(
        long,
        424,
        "Request failed during generation: the model produced non-finite logits",
        kind="generation",
    )
    assert [r.json()["generated_text"] for r in shorts] == alone  # untouched by their neighbours
    assert status == 200 and len(events) > 150  # it streamed until position 200, then:
    assert events[-1] == {"error": events[-1]["error"], "error_type": "generation"}
    assert events[-1]["error"].startswith("Request failed during generation: ")
    assert all("token" in e for e in events[:-1])
    assert wait_until(lambda: engine.in_flight == 0)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert metric(c, 'tgi_request_failure_total{err="generation"}') == failures_before + 2
        assert [generate(c, p, max_new_tokens=20).json()["generated_text"] for p in short] == alone


@pytest.mark.parametrize(
    ("parameters", "status", "message"),
    [
        (
            {"temperature": 1e-300},
            422,
            "Input validation error: `temperature` must be strictly positive",
        ),
        ({"top_p": 1e-300}, 422, "Input validation error: `top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1e-300}, 422, "Input validation error: `typical_p` must be > 0.0 and < 1.0"),
        ({"repetition_penalty": 1e-300}, 422, "`repetition_penalty` must be strictly positive"),
        (
            {"temperature": 1e39},
            422,
            "parameters.temperature: Value error, is too large for a 32-bit float",
        ),
        ({"frequency_penalty": -1e39}, 422, "parameters.frequency_penalty"),
        ({"seed": 2**64}, 422, "parameters.seed: Input should be less than or equal to"),
        ({"seed": -1}, 422, "parameters.seed"),
        ({"max_new_tokens": 2**32}, 422, "parameters.max_new_tokens"),
        ({"top_k": 2**31}, 422, "parameters.top_k"),
        ({"top_n_tokens": -1}, 422, "parameters.top_n_tokens"),
        ({"truncate": 2**64}, 422, "parameters.truncate"),
        ({"best_of": 1.5}, 422, "parameters.best_of"),
    ],
)
def test_numbers_are_read_as_tgis_rust_types(client, parameters, status, message):
    tgi_error(generate(client, **parameters), status, message)


def test_raw_numbers_json_cannot_hold_are_a_400(client):
    for raw in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = f'{{"inputs": "hi", "parameters": {{"temperature": {raw}}}}}'
        r = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
        tgi_error(r, 400, "Failed to parse the request body as JSON: ")


def test_extreme_but_valid_values_decode_finitely(client):
    """float32's smallest positive values are positive: TGI accepts them, and the sampler stays
    finite (a temperature of 1.4e-45 is greedy in effect)."""
    greedy = generate(client, max_new_tokens=12, details=True).json()
    for parameters in (
        {"temperature": 1e-45},
        {"top_p": 1e-45},
        {"temperature": 1e-45, "top_k": 3, "top_p": 0.5},
    ):
        r = generate(client, max_new_tokens=12, details=True, seed=5, **parameters)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == greedy["generated_text"], parameters
    for parameters in (
        {"repetition_penalty": 1e-45},
        {"repetition_penalty": 3.4e38},
        {"frequency_penalty": 2.0, "temperature": 3e38, "do_sample": True},
    ):
        r = generate(client, max_new_tokens=12, details=True, seed=5, **parameters)
        assert r.status_code == 200, r.text
        assert r.json()["details"]["generated_tokens"] == 12


# --- 2. nothing slow or large on the event loop ---------------------------------------------------


class HealthWatch:
    """Polls /health from a thread and keeps the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.stop = url, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                assert c.get(self.url + "/health").status_code == 200
                self.worst = max(self.worst, time.perf_counter() - t)
                time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_megabyte_inputs_never_stall_the_event_loop(server):
    huge = "The quick brown fox. " * (1_900_000 // 21)  # ~1.9 MB, under the body limit

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            posts = [
                ac.post("/generate", json={"inputs": huge, "parameters": {"max_new_tokens": 5}})
                for _ in range(3)
            ]
            posts.append(ac.post("/tokenize", json={"inputs": huge}))
            return await asyncio.gather(*posts)

    with HealthWatch(server.url) as watch:
        replies = asyncio.run(flood())
    for r in replies[:3]:  # refused by size, before tokenizing; TGI's words, a lower bound
        tgi_error(r, 422, "`inputs` tokens + `max_new_tokens` must be <= 256. Given: at least ")
    tgi_error(replies[3], 422, "/tokenize lists at most 4096")
    assert all(len(r.content) < 500 for r in replies)  # not 41 MB
    assert watch.worst < 1.0, f"/health took {watch.worst:.2f}s"


def test_long_inputs_are_tokenized_in_their_own_lane(server, client):
    """With ``truncate``, a long input must be tokenized (TGI keeps its last tokens): in a
    worker thread, one at a time, at most four waiting; /health stays quick meanwhile."""
    long = "Tokens, tokens and more tokens. " * 8000  # 256 K characters
    body = {"inputs": long, "parameters": {"max_new_tokens": 3, "truncate": 10, "details": True}}

    async def several(n):
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/generate", json=body) for _ in range(n)))

    with HealthWatch(server.url) as watch:
        replies = asyncio.run(several(7))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= C.LARGE_INPUT_WAITING and set(codes) <= {200, 429}
    assert 429 in codes  # more than four long inputs at once: TGI's overload answer
    r = next(r for r in replies if r.status_code == 200)
    assert r.headers["x-prompt-tokens"] == "10"
    assert watch.worst < 1.0, f"/health took {watch.worst:.2f}s"
    pieces = client.post("/tokenize", json={"inputs": "word " * 1500}).json()
    assert 3000 <= len(pieces) <= 4096  # within /tokenize's cap: listed


# --- 3. unexpected input and exceptions: TGI's shape, counted -------------------------------------


def test_unicode_the_tokenizer_cannot_take_is_a_400(client):
    for raw in (
        b'{"inputs": "\\ud800"}',
        b'{"inputs": "a\\udfff b"}',
        b'{"inputs": "ok", "x": "\\ud800"}',
    ):
        r = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
        tgi_error(r, 400, "lone UTF-16 surrogate")
    ok = b'{"inputs": "emoji \\ud83d\\ude00", "parameters": {"max_new_tokens": 2}}'
    assert (
        client.post(
            "/generate", content=ok, headers={"Content-Type": "application/json"}
        ).status_code
        == 200
    )
    r = client.post(
        "/generate", content=b'{"inputs": "\xff\xfe"}', headers={"Content-Type": "application/json"}
    )
    tgi_error(r, 400, "the body is not UTF-8")
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/generate", content=deep, headers={"Content-Type": "application/json"})
    tgi_error(r, 400, "nested too deeply")
    for path in ("/v1/chat/completions", "/tokenize", "/chat_tokenize", "/v1/completions", "/"):
        r = client.post(
            path, content=b'{"inputs": "\\ud800"}', headers={"Content-Type": "application/json"}
        )
        tgi_error(r, 400, "lone UTF-16 surrogate")


def test_a_bug_answers_in_tgis_shape_and_is_counted(server, client, monkeypatch):
    service = server.app.state.service

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the tokenizer wrapper")

    before = metric(client, 'tgi_request_failure_total{err="internal"}')
    monkeypatch.setattr(service.own.encoder, "encode", broken)
    tgi_error(generate(client), 500, "internal error (RuntimeError)", kind="internal")
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {}})
    tgi_error(r, 500, "internal error (RuntimeError)", kind="internal")
    assert metric(client, 'tgi_request_failure_total{err="internal"}') == before + 2
    monkeypatch.undo()
    assert generate(client, max_new_tokens=2).status_code == 200


def test_a_failure_mid_stream_is_a_tgi_error_event(server, client):
    calls = {"n": 0}

    def fail_third_token(seq):
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # each request's third token
            raise RuntimeError("injected sampler failure")

    server.engine.sample_hook = fail_third_token
    try:
        r, events = stream_events(
            client, "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 9}}
        )
        _, chat = stream_events(
            client,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "stream": True},
        )
    finally:
        server.engine.sample_hook = None
    assert r.status_code == 200 and len(events) == 3
    assert events[-1] == {
        "error": "Request failed during generation: injected sampler failure",
        "error_type": "generation",
    }
    assert chat[-1] == "[DONE]" and chat[-2]["error"]["http_status_code"] == 422


# --- 4. body limits -------------------------------------------------------------------------------


def test_oversized_chunked_body_is_a_413(client):
    def chunks(total: int):
        part = b"x" * 65536
        yield b'{"inputs": "'
        for _ in range(total // len(part)):
            yield part
        yield b'"}'

    r = client.post(
        "/generate",
        content=chunks(C.MAX_BODY_BYTES + 100_000),
        headers={"Content-Type": "application/json"},
    )
    tgi_error(r, 413, f"request body is larger than the {C.MAX_BODY_BYTES}-byte limit")
    small = iter([b'{"inputs": "chunked', b' but small", "parameters": {"max_new_tokens": 2}}'])
    assert (
        client.post(
            "/generate", content=small, headers={"Content-Type": "application/json"}
        ).status_code
        == 200
    )
