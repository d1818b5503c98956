"""The native server's HTTP API, against a real uvicorn on a free port.

One server for the module (API key and CORS origins configured), driven by httpx as a client
would: every endpoint, SSE parsed event by event, each validation error, auth, CORS, 50
concurrent requests, stop sequences.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serving_helpers import ThreadServer, stream_events

from facts import PROMPT_FORMAT_FILE
from serving import constants as C
from serving.model import load_model
from serving.server import create_app
from serving.settings import Settings

KEY = "test-key-1"
ORIGIN = "http://chat.example:8000"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A real uvicorn on a free port, in a thread of this process (the CLI itself is started
    as a subprocess in test_serving_scripts.py)."""
    from conftest import free_port

    settings = Settings(
        model=str(tiny_model_dir), api_key=KEY, cors_origins=(ORIGIN, "null"), threads=1
    )
    loaded = load_model(settings.model, slots=settings.max_batch_size)
    with ThreadServer(create_app(settings, loaded), free_port()) as srv:
        yield srv.url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def greedy(inputs: str, n: int = 12, **extra) -> dict:
    return {"inputs": inputs, "parameters": {"max_new_tokens": n, "details": True, **extra}}


# --- endpoints ------------------------------------------------------------------------------------


def test_health_is_open_and_info_describes_the_model(server, client, tiny_model_dir):
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed
    info = client.get("/info").json()
    assert info["model_id"] == tiny_model_dir.parent.name  # runs/<run>/model: the run's name
    assert info["model_dtype"] == "torch.float32"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (255, 256)
    assert info["max_stop_sequences"] == C.MAX_STOP_SEQUENCES
    assert info["version"] == C.VERSION
    saved = json.loads((tiny_model_dir / PROMPT_FORMAT_FILE).read_text())
    assert info["prompt_format"] == saved


def test_generate_shape_and_details(client):
    r = client.post("/generate", json=greedy("The quick brown fox", 10))
    assert r.status_code == 200
    body = r.json()
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 10
    assert d["seed"] is None  # greedy: TGI reports no seed
    assert len(d["tokens"]) == 10
    assert set(d["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert d["tokens"][0]["logprob"] <= 0
    # without details=true there is no details key at all (TGI omits it)
    plain = client.post(
        "/generate", json={"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 10}}
    ).json()
    assert plain == {"generated_text": body["generated_text"]}
    full = client.post(
        "/generate", json=greedy("The quick brown fox", 10, return_full_text=True)
    ).json()
    assert full["generated_text"] == "The quick brown fox" + body["generated_text"]


def test_sampling_is_reproducible_with_a_seed(client):
    body = greedy("Once upon", 15, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a, b = (client.post("/generate", json=body).json() for _ in range(2))
    assert a == b and a["details"]["seed"] == 7


def test_generate_stream_events_as_tgi(client):
    body = greedy("The quick brown fox", 8)
    r, events = stream_events(client, "/generate_stream", body)
    assert r.status_code == 200 and len(events) == 8
    assert [e["index"] for e in events] == list(range(1, 9))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"] == {
        "finish_reason": "length",
        "generated_tokens": 8,
        "seed": None,
        "input_length": last["details"]["input_length"],
    }
    whole = client.post("/generate", json=body).json()
    assert last["generated_text"] == whole["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]
    # details only when asked for, as in TGI
    _, events = stream_events(
        client, "/generate_stream", {**body, "parameters": {"max_new_tokens": 3}}
    )
    assert events[-1]["details"] is None and events[-1]["generated_text"] is not None


def test_compat_route(client):
    r = client.post("/", json={**greedy("Hi", 4), "stream": False})
    assert r.status_code == 200 and r.json()[0]["details"]["generated_tokens"] == 4
    _, events = stream_events(client, "/", {**greedy("Hi", 4), "stream": True})
    assert len(events) == 4


def test_completions(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "temperature": 0})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    same = client.post("/generate", json=greedy("Hello", 6)).json()
    assert body["choices"][0]["text"] == same["generated_text"]
    two = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    _, events = stream_events(
        client,
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True},
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == same["generated_text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completions_use_the_chat_template(client, tiny_model_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "### Instruction:\nName a colour." in prompt
    assert out["usage"]["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
    raw = client.post("/generate", json=greedy(prompt, 5)).json()
    assert out["choices"][0]["message"]["content"] == raw["generated_text"]
    _, events = stream_events(
        client,
        "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 5
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == raw["generated_text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_and_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["object"] == "model"
    client.post("/generate", json=greedy("metrics", 3))
    text = client.get("/metrics").text
    assert "tgi_request_success_total" in text and "tgi_queue_size" in text
    done = [ln for ln in text.splitlines() if ln.startswith("tgi_request_success_total")]
    assert float(done[0].split()[-1]) >= 1


# --- stop sequences -------------------------------------------------------------------------------


def test_stop_sequence_across_token_boundary(client):
    tokens = client.post("/generate", json=greedy("The quick brown fox", 30)).json()
    texts = [t["text"] for t in tokens["details"]["tokens"]]
    i = next(i for i in range(len(texts) - 1) if texts[i] and texts[i + 1])
    stop = texts[i][-1] + texts[i + 1][0]  # spans two tokens
    expected = next(k + 1 for k in range(len(texts)) if stop in "".join(texts[: k + 1]))
    r = client.post("/generate", json=greedy("The quick brown fox", 30, stop=[stop])).json()
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert r["details"]["generated_tokens"] == expected
    assert stop in r["generated_text"]  # TGI keeps the stop sequence in the text
    _, events = stream_events(
        client, "/generate_stream", greedy("The quick brown fox", 30, stop=[stop])
    )
    assert len(events) == expected
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    chat = client.post(
        "/v1/completions",
        json={"prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0, "stop": stop},
    ).json()
    assert chat["choices"][0]["finish_reason"] == "stop_sequence"


# --- validation, limits, auth, CORS ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "inputs", "message"),
    [
        ({}, "", "`inputs` cannot be empty"),
        ({"temperature": 0}, "hi", "`temperature` must be strictly positive"),
        ({"temperature": -1.0}, "hi", "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "hi", "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0}, "hi", "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "hi", "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "hi", "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "hi", "`stop` supports up to 4 stop sequences"),
        (
            {"max_new_tokens": 250},
            "word " * 20,
            "`inputs` tokens + `max_new_tokens` must be <= 256",
        ),
        ({"max_new_tokens": "5"}, "hi", "parameters.max_new_tokens"),
        ({"details": "yes"}, "hi", "parameters.details"),
    ],
)
def test_validation_errors_are_tgi_shaped(client, parameters, inputs, message):
    for path in ("/generate", "/generate_stream"):
        r = client.post(path, json={"inputs": inputs, "parameters": parameters})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error_type"] == "validation" and message in body["error"]
        assert set(body) == {"error", "error_type"}


def test_malformed_bodies(client):
    r = client.post(
        "/generate", content=b'{"inputs": "hi",', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error_type"] == "validation"  # axum's 400, as TGI
    assert r.json()["error"].startswith("Failed to parse the request body as JSON")
    r = client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    huge = json.dumps({"inputs": "x" * (C.MAX_BODY_BYTES + 10)})
    r = client.post("/generate", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "validation"
    r = client.get("/nope")
    assert r.status_code == 404 and set(r.json()) == {"error", "error_type"}


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/generate", json=greedy("hi", 2), headers=headers)
        assert r.status_code == 401
        assert r.json()["error_type"] == "authentication"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/info").status_code == 401
    assert httpx.get(f"{server}/metrics").status_code == 401


def test_cors_allows_only_configured_origins(server):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    for origin in (ORIGIN, "null"):
        r = httpx.options(f"{server}/generate", headers={"Origin": origin, **preflight})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(f"{server}/generate", headers={"Origin": "http://evil.example", **preflight})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    # a real request from the page, and a rejected one, both readable by the allowed origin
    ok = httpx.post(
        f"{server}/generate",
        json=greedy("hi", 2),
        headers={"Origin": "null", "Authorization": f"Bearer {KEY}"},
    )
    assert ok.headers["access-control-allow-origin"] == "null"
    denied = httpx.post(f"{server}/generate", json=greedy("hi", 2), headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN


# --- concurrency ----------------------------------------------------------------------------------


def test_fifty_concurrent_requests_all_answered_and_batching_changes_nothing(server, client):
    prompts = [f"request number {i} says" + " hello" * (i % 7) for i in range(50)]
    solo = client.post("/generate", json=greedy(prompts[3], 8)).json()["generated_text"]

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server, headers=headers, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/generate", json=greedy(p, 8)) for p in prompts))

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200] * 50
    assert all(r.json()["details"]["generated_tokens"] == 8 for r in replies)
    # decoded inside a batch of up to 8 with different lengths: same greedy text as alone
    assert replies[3].json()["generated_text"] == solo


def test_tokenize_counts_like_the_model_tokenizer(client, tiny_model_dir):
    from transformers import AutoTokenizer

    text = 'Say "hi" 😀 twice, ünïcode'
    got = client.post("/tokenize", json={"inputs": text})
    assert got.status_code == 200
    pieces = got.json()
    assert [p["id"] for p in pieces] == AutoTokenizer.from_pretrained(tiny_model_dir)(
        text
    ).input_ids
    data = text.encode()  # TGI's offsets are byte offsets into the UTF-8 input
    assert all(p["text"] == data[p["start"] : p["stop"]].decode() for p in pieces)
    assert pieces[0]["start"] == 0 and pieces[-1]["stop"] == len(data)
    assert client.post("/tokenize", json={"inputs": ""}).json() == []  # TGI: no tokens, no error
