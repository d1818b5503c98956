"""TGI 3.3's API beyond the basics, against a real uvicorn: grammars (JSON Schema and regex,
constrained decoding beside unconstrained requests in one batch), the chat route's
response_format, top_n_tokens and OpenAI logprobs, best_of, decoder_input_details,
watermark, /chat_tokenize, /ping, the x-* headers, and /info as TGI reports it. Each answer and
each refusal is checked against TGI's own field names, limits and words (router/src)."""

from __future__ import annotations

import asyncio
import json
import math
import re

import httpx
import jsonschema
import pytest
from serving_helpers import ThreadServer, stream_events

from serving import constants as C
from serving.model import load_model
from serving.server import create_app
from serving.settings import Settings

KEY = "tgi-key"
PERSON = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from conftest import free_port

    settings = Settings(model=str(tiny_model_dir), api_key=KEY, threads=1)
    loaded = load_model(settings.model, slots=settings.max_batch_size)
    with ThreadServer(create_app(settings, loaded), free_port()) as srv:
        yield srv


@pytest.fixture
def client(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


def generate(client, inputs="The quick brown fox", **parameters):
    r = client.post("/generate", json={"inputs": inputs, "parameters": parameters})
    return r


def refused(r, message: str, status: int = 422, kind: str = "validation") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body == {"error": body["error"], "error_type": kind}
    assert message in body["error"], body["error"]


# --- grammar --------------------------------------------------------------------------------------


def test_json_grammar_constrains_the_output_to_the_schema(client):
    for grammar in (
        {"type": "json", "value": PERSON},
        {"type": "json", "value": json.dumps(PERSON)},  # TGI also takes the schema as a string
        {"type": "json_object", "value": PERSON},  # TGI's alias
    ):
        r = generate(client, max_new_tokens=60, details=True, grammar=grammar)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["details"]["finish_reason"] == "eos_token"  # the grammar was complete
        jsonschema.validate(json.loads(out["generated_text"]), PERSON)
    sampled = generate(
        client,
        max_new_tokens=60,
        do_sample=True,
        temperature=1.5,
        seed=3,
        grammar={"type": "json", "value": PERSON},
    )
    jsonschema.validate(json.loads(sampled.json()["generated_text"]), PERSON)


def test_json_grammar_reads_properties_as_outlines_does(client):
    """TGI compiles with outlines-core, which reads ``properties`` as an object of exactly those
    keys (no ``type``: still an object; no ``additionalProperties: false``: still no extras)."""
    loose = {
        "properties": {"colour": {"enum": ["red", "blue"]}, "n": {"type": "integer", "maximum": 9}}
    }
    for seed in range(3):
        r = generate(
            client,
            max_new_tokens=40,
            do_sample=True,
            seed=seed,
            grammar={"type": "json", "value": loose},
        )
        value = json.loads(r.json()["generated_text"])
        assert isinstance(value, dict) and set(value) <= {"colour", "n"}, value


def test_regex_grammar(client):
    for pattern, check in (("(yes|no)", {"yes", "no"}.__contains__), ("[0-9]{3}", str.isdigit)):
        for params in ({}, {"do_sample": True, "seed": 1}):
            r = generate(
                client, max_new_tokens=10, grammar={"type": "regex", "value": pattern}, **params
            )
            text = r.json()["generated_text"]
            assert re.fullmatch(pattern, text) and check(text), text


def test_grammar_beside_unconstrained_requests_in_one_batch(server, client):
    """Continuous batching: constrained and free requests decode together; neither changes
    the other's tokens."""
    free = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 20}}
    alone = client.post("/generate", json=free).json()["generated_text"]
    bound = {
        "inputs": "Give me JSON",
        "parameters": {"max_new_tokens": 60, "grammar": {"type": "json", "value": PERSON}},
    }
    steps = server.engine.steps

    async def together():
        async with httpx.AsyncClient(base_url=server.url, headers=client.headers, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/generate", json=b) for b in [free, bound] * 3))

    replies = asyncio.run(together())
    assert [r.status_code for r in replies] == [200] * 6
    for r in replies[0::2]:
        assert r.json()["generated_text"] == alone
    for r in replies[1::2]:
        jsonschema.validate(json.loads(r.json()["generated_text"]), PERSON)
    assert server.engine.steps - steps < 6 * 40  # they shared decode steps


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (
            {"type": "json", "value": {"type": "object"}},
            "grammar is not valid: Grammar must have a 'properties' field",
        ),
        ({"type": "json", "value": 5}, "grammar is not supported"),
        ({"type": "json", "value": "{not json"}, "grammar is not valid: "),
        ({"type": "json", "value": {"type": "frob", "properties": {}}}, "grammar is not valid: "),
        ({"type": "regex", "value": "[a-"}, "grammar is not valid: "),
    ],
)
def test_bad_grammars_are_refused_as_tgi_refuses_them(client, grammar, message):
    refused(generate(client, grammar=grammar), "Input validation error: " + message)


def test_unknown_grammar_type_is_a_422(client):
    r = generate(client, grammar={"type": "lark", "value": "start: 'a'"})
    refused(r, "Failed to deserialize the JSON body into the target type: parameters.grammar")


def test_chat_response_format(client):
    def chat(response_format, **extra):
        body = {
            "messages": [{"role": "user", "content": "JSON please"}],
            "max_tokens": 60,
            "temperature": 0,
            "response_format": response_format,
            **extra,
        }
        return client.post("/v1/chat/completions", json=body)

    for fmt in (
        {"type": "json_object", "value": PERSON},  # TGI's own shape
        {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},  # OpenAI's
    ):
        r = chat(fmt)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
    anything = chat({"type": "json_object"})  # OpenAI's JSON mode: any object
    assert isinstance(json.loads(anything.json()["choices"][0]["message"]["content"]), dict)
    plain = chat({"type": "text"})
    assert plain.status_code == 200
    _, events = stream_events(
        client,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "JSON"}],
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
            "response_format": {"type": "json_object", "value": PERSON},
        },
    )
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
    jsonschema.validate(json.loads(text), PERSON)
    refused(
        chat({"type": "json_object", "value": PERSON}, tools=[{"type": "function"}]),
        "Tool error: Grammar and tools are mutually exclusive",
        kind="tool_error",
    )
    refused(
        chat({"type": "text"}, tools=[{"type": "function"}]),
        "tools are not supported",
        kind="tool_error",
    )


# --- top_n_tokens and logprobs --------------------------------------------------------------------


def test_top_n_tokens_in_details_and_in_each_stream_event(client):
    out = generate(client, max_new_tokens=6, details=True, top_n_tokens=3).json()["details"]
    assert len(out["top_tokens"]) == len(out["tokens"]) == 6
    for token, top in zip(out["tokens"], out["top_tokens"], strict=True):
        assert len(top) >= 3 and set(top[0]) == {"id", "text", "logprob", "special"}
        logprobs = [t["logprob"] for t in top]
        assert logprobs == sorted(logprobs, reverse=True)
        assert top[0]["id"] == token["id"]  # greedy: the chosen token is the likeliest
        assert math.isclose(top[0]["logprob"], token["logprob"], rel_tol=1e-5)
    assert "top_tokens" not in generate(client, max_new_tokens=2, details=True).json()["details"]
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 4, "top_n_tokens": 2}}
    _, events = stream_events(client, "/generate_stream", body)
    assert all(len(e["top_tokens"]) >= 2 for e in events)
    _, events = stream_events(
        client, "/generate_stream", {**body, "parameters": {"max_new_tokens": 2}}
    )
    assert all("top_tokens" not in e for e in events)  # TGI leaves the empty list out
    sampled = generate(client, max_new_tokens=4, details=True, top_n_tokens=5, top_k=2, seed=1)
    for top in sampled.json()["details"]["top_tokens"]:
        assert len(top) == 2  # top-k removed the rest: their probability is 0
    refused(generate(client, top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6")


def test_openai_logprobs(client):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = client.post("/v1/chat/completions", json=body).json()
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 4
    assert all(
        len(c["top_logprobs"]) >= 2 and c["token"] == c["top_logprobs"][0]["token"] for c in content
    )
    assert (
        client.post("/v1/chat/completions", json={**body, "logprobs": False}).json()["choices"][0][
            "logprobs"
        ]
        is None
    )
    _, events = stream_events(client, "/v1/chat/completions", {**body, "stream": True})
    assert all(len(e["choices"][0]["logprobs"]["content"]) == 1 for e in events[:-1])
    r = client.post("/v1/chat/completions", json={**body, "top_logprobs": 6})
    refused(r, "`top_n_tokens` must be >= 0 and <= 5. Given: 6")


# --- best_of, decoder_input_details, watermark, parameters ----------------------------------------


def test_best_of_keeps_the_likeliest_sequence(client):
    r = generate(client, max_new_tokens=5, details=True, best_of=2, do_sample=True)
    details = r.json()["details"]
    [other] = details["best_of_sequences"]
    mean = lambda seq: sum(t["logprob"] for t in seq["tokens"]) / len(seq["tokens"])  # noqa: E731
    assert mean(details) >= mean(other)
    assert details["seed"] != other["seed"]
    assert (
        "best_of_sequences"
        not in generate(client, max_new_tokens=2, details=True).json()["details"]
    )
    refused(generate(client, best_of=2), "you must use sampling when `best_of` is > 1")
    refused(generate(client, best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3")
    refused(
        generate(client, best_of=2, do_sample=True, seed=4),
        "`seed` must not be set when `best_of` > 1",
    )
    r = client.post(
        "/generate_stream", json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}
    )
    refused(r, "`best_of` != 1 is not supported when streaming tokens")


def test_decoder_input_details(client, tiny_model_dir):
    from transformers import AutoTokenizer

    out = generate(client, "The quick brown", max_new_tokens=2, decoder_input_details=True).json()
    prefill = out["details"]["prefill"]  # decoder_input_details implies details, as in TGI
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("The quick brown")["input_ids"]
    assert [p["id"] for p in prefill] == ids
    assert prefill[0]["logprob"] is None and all(p["logprob"] < 0 for p in prefill[1:])
    assert generate(client, max_new_tokens=2, details=True).json()["details"]["prefill"] == []
    r = client.post(
        "/generate_stream", json={"inputs": "x", "parameters": {"decoder_input_details": True}}
    )
    refused(r, "`decoder_input_details` == true is not supported when streaming tokens")


def test_watermark_biases_the_choice_reproducibly(client):
    plain = generate(client, max_new_tokens=15, details=True).json()
    marked = [
        generate(client, max_new_tokens=15, details=True, watermark=True).json() for _ in range(2)
    ]
    assert marked[0] == marked[1]
    assert marked[0]["details"]["tokens"] != plain["details"]["tokens"]


def test_no_parameters_samples_as_tgi_does(client):
    """TGI's default_parameters(): without a `parameters` object, do_sample is true."""
    r = client.post("/generate", json={"inputs": "Hello"})
    assert r.status_code == 200
    seeds = [
        client.post("/generate", json={"inputs": "Hi", "parameters": {"details": True}}).json()
    ]
    assert seeds[0]["details"]["seed"] is None  # "parameters": {} is greedy


# --- the smaller routes, headers, /info -----------------------------------------------------------


def test_ping_and_get_root_are_health_probes(server):
    for path in ("/ping", "/", "/health"):
        assert httpx.get(server.url + path).status_code == 200  # no key, as TGI's info routes


def test_chat_tokenize(client, tiny_model_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Name a colour."}]
    out = client.post("/chat_tokenize", json={"messages": messages}).json()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out["templated_text"] == prompt
    assert [t["id"] for t in out["tokenize_response"]] == tok(prompt, add_special_tokens=False)[
        "input_ids"
    ]


def test_timing_headers(client):
    r = generate(client, max_new_tokens=5, details=True)
    h = r.headers
    assert h["x-compute-type"] == "cpu"
    assert int(h["x-generated-tokens"]) == r.json()["details"]["generated_tokens"] == 5
    assert int(h["x-prompt-tokens"]) > 0
    assert int(h["x-compute-characters"]) == len("The quick brown fox")
    parts = [int(h[k]) for k in ("x-validation-time", "x-queue-time", "x-inference-time")]
    assert all(p >= 0 for p in parts) and int(h["x-total-time"]) >= max(parts)
    assert float(h["x-compute-time"]) * 1000 >= int(h["x-total-time"])
    assert int(h["x-time-per-token"]) <= int(h["x-inference-time"])
    with client.stream("POST", "/generate_stream", json={"inputs": "abc", "parameters": {}}) as s:
        assert s.headers["x-compute-characters"] == "3" and s.headers["x-accel-buffering"] == "no"
    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    )
    assert chat.headers["x-generated-tokens"] == "2"
    two = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3})
    assert two.headers["x-generated-tokens"] == "6"  # TGI adds up the prompts' headers


def test_info_is_tgi_3_3s(client, tiny_model_dir):
    info = client.get("/info").json()
    tgi = {
        "model_id",
        "model_sha",
        "model_pipeline_tag",
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "max_client_batch_size",
        "router",
        "version",
        "sha",
        "docker_label",
    }
    assert tgi <= set(info)
    ours = {"model_dtype", "model_device_type", "quantize", "prompt_format", "models"}
    assert set(info) - tgi == ours
    [own] = info["models"]  # one model served: it alone, described as /info describes it
    assert own["id"] == info["model_id"] and own["kind"] == "model" and own["base"] is None
    assert own["max_total_tokens"] == info["max_total_tokens"] and own["memory_bytes"] > 0
    assert (info["max_best_of"], info["max_client_batch_size"], info["validation_workers"]) == (
        2,
        4,
        2,
    )
    assert info["model_pipeline_tag"] == "text-generation" and info["version"] == C.VERSION


def test_completions_as_tgi(client):
    refused(
        client.post("/v1/completions", json={"prompt": ["a"] * 5, "max_tokens": 2}),
        "Number of prompts exceeds the maximum allowed batch size of 4",
        kind="batch size exceeded",
    )
    refused(
        client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}),
        "Suffix is not supported",
        kind="suffix not supported",
    )
    _, events = stream_events(
        client,
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 3, "stream": True, "temperature": 0},
    )
    chunks = events[:-1]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == ["", "", "length"]
    assert "usage" not in chunks[0] and chunks[-1]["usage"]["completion_tokens"] == 3
    _, events = stream_events(
        client, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True}
    )
    # One prompt after the other, each up to its 2 tokens (fewer if it samples EOS) and ending
    # with its finish reason, then [DONE].
    indices = [c["choices"][0]["index"] for c in events[:-1]]
    assert indices == sorted(indices) and set(indices) == {0, 1} and events[-1] == "[DONE]"
    for i in (0, 1):
        mine = [c["choices"][0] for c in events[:-1] if c["choices"][0]["index"] == i]
        assert 1 <= len(mine) <= 2 and mine[-1]["finish_reason"] in ("length", "eos_token")
        assert all(c["finish_reason"] == "" for c in mine[:-1])
