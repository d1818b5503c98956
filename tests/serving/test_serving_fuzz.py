"""Property-based fuzzing of the whole API, against a real uvicorn.

Two generators, both Hypothesis (derandomized, no example database: the same requests on every
run, so CI is reproducible):

- schemathesis reads the server's own OpenAPI document (/openapi.json, generated from
  serving/schema.py) and sends valid and invalid requests to every operation it lists;
- hand-written strategies send what a schema-driven generator rarely reaches: JSON that
  Python accepts and TGI's serde refuses (NaN, Infinity, 1e999, lone surrogates), numbers at the
  edges of float32/u32/u64, grammars, malformed and truncated bodies, to every POST route.

For every answer: no 5xx; an error is TGI's ``{"error", "error_type"}`` with the status TGI gives
that type; a 200 has the documented shape. Afterwards the server is healthy, nothing is in
flight, and it still generates. The model has a 64-token context so no request runs long; the
whole module takes well under a minute on two cores.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import drain, sse_events, start_subprocess_server, stop_subprocess_server

from facts import API_KEY_ENV
from serving import constants as C

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 24  # the fuzzed model's context: every generation is short
EXAMPLES = 110  # per POST operation and generation mode: over 1,500 requests
GET_EXAMPLES = 5  # GET operations take no input: a few requests each
RAW_EXAMPLES = 700  # hand-written strategies, spread over the POST routes
STATUS = {  # every error type the server may answer with, and its status codes
    C.ERROR_VALIDATION: {400, 413, 422},
    C.ERROR_AUTH: {401},
    C.ERROR_OVERLOADED: {429},
    C.ERROR_TEMPLATE: {422},
    C.ERROR_TOOL: {422},
    C.ERROR_SUFFIX: {422},
    C.ERROR_BATCH_SIZE: {422},
    C.ERROR_GENERATION: {424},
    C.ERROR_NOT_FOUND: {404},
    C.ERROR_HTTP: {405},
}
POST_ROUTES = [
    "/generate",
    "/generate_stream",
    "/",
    "/tokenize",
    "/v1/completions",
    "/v1/chat/completions",
    "/chat_tokenize",
]


def short_context_copy(src, out, n_positions: int):
    """The tiny model with its context cut to ``n_positions``: no fuzzed request runs long."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out)
    model = AutoModelForCausalLM.from_pretrained(src)
    wpe = model.transformer.wpe
    wpe.weight.data = wpe.weight.data[:n_positions].clone()
    wpe.num_embeddings = n_positions
    model.config.n_positions = n_positions
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    """``python -m serving.server`` in its own process: the fuzzing client and the server do
    not share a GIL, and the server is exactly what users run."""
    from conftest import free_port

    model = short_context_copy(tiny_model_dir, tmp_path_factory.mktemp("fuzz") / "model", CONTEXT)
    port = free_port()
    proc = start_subprocess_server(["--model", str(model)], port, {API_KEY_ENV: KEY})
    drain(proc)
    yield f"http://127.0.0.1:{port}"
    stop_subprocess_server(proc)


@pytest.fixture(scope="module")
def session():
    """One keep-alive connection for all of schemathesis' requests."""
    import requests

    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def client(fuzz_server):
    with httpx.Client(base_url=fuzz_server, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def api(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json", headers=AUTH)
    return schema


SENT = {"requests": 0}  # how many answers were checked (the last test reports it)


def check_answer(status: int, content_type: str, body: bytes) -> None:
    """What every answer must be: no 5xx; errors in TGI's shape and status; streams parse."""
    SENT["requests"] += 1
    assert status < 500, f"{status}: {body[:300]!r}"
    if status >= 400:
        error = json.loads(body)
        assert set(error) == {"error", "error_type"}, error
        assert isinstance(error["error"], str) and error["error"], error
        assert status in STATUS[error["error_type"]], (status, error)
    elif content_type.startswith("text/event-stream"):
        events = sse_events(body.decode().splitlines())
        for e in events:
            if not (isinstance(e, dict) and "error" in e):
                continue
            # a failure after the stream began: only the model may fail (TGI's generation
            # error); OpenAI streams carry {"message", "http_status_code": 422} instead
            if isinstance(e["error"], dict):
                assert e["error"]["message"].startswith(C.GENERATION_PREFIX), e
            else:
                assert e["error_type"] == C.ERROR_GENERATION, e


OPERATIONS = [  # every operation /openapi.json lists (a test below holds the two together)
    ("GET", "/health"),
    ("GET", "/ping"),
    ("GET", "/"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    *[("POST", route) for route in POST_ROUTES],
]
CASES = [("POST", p, mode) for p in POST_ROUTES for mode in ("positive", "negative")]
_strategies: dict[tuple[str, str, str], st.SearchStrategy] = {}


def test_the_fuzzed_operations_are_all_the_documented_ones(api):
    documented = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert documented == set(OPERATIONS)


def fuzz(api, session, method: str, path: str, mode: str, data) -> None:
    """One schemathesis case: sent, checked by schemathesis against the document, and by
    ``check_answer`` against TGI's rules."""
    key = (method, path, mode)
    if key not in _strategies:
        _strategies[key] = api[path][method].as_strategy(schemathesis.GenerationMode(mode))
    case = data.draw(_strategies[key])
    response = case.call_and_validate(
        session=session,
        headers=AUTH,
        timeout=60,
        excluded_checks=[
            # TGI's rules reach past one field (inputs tokens + max_new_tokens <= the context,
            # temperature > 0, ...): a request valid by the schema may still be a 422
            schemathesis.checks.positive_data_acceptance,
        ],
    )
    content_type = response.headers.get("content-type", [""])  # schemathesis: lists of values
    check_answer(response.status_code, content_type[0], response.content)


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
@settings(FUZZ, max_examples=EXAMPLES)
@given(data=st.data())
def test_every_post_operation_of_the_openapi_document(api, session, method, path, mode, data):
    fuzz(api, session, method, path, mode, data)


@pytest.mark.parametrize(("method", "path"), [op for op in OPERATIONS if op[0] == "GET"])
@settings(FUZZ, max_examples=GET_EXAMPLES)
@given(data=st.data())
def test_every_get_operation_of_the_openapi_document(api, session, method, path, data):
    fuzz(api, session, method, path, "positive", data)


# --- hand-written strategies: what serde refuses and Python accepts ------------------------------

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-45, 1.4e-45, 1e-300, 1e-38, 3.4e38, 3.5e38, 1e39, -0.0, 0.0, 1.0, 2.0]),
)
ints = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64]),
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(["\ud800", "a\udfff", "\x00", "<|endoftext|>", "😀" * 10, "", " " * 50]),
)
scalars = st.one_of(st.none(), st.booleans(), floats, ints, texts)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
grammars = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["json", "json_object", "regex", "json_schema", "lark"]),
            "value": values,
        }
    ),
    st.just({"type": "json", "value": {"properties": {"a": {"type": "integer"}}}}),
    st.just({"type": "regex", "value": "[ab]{2,5}"}),
    st.just(
        {"type": "json_schema", "value": {"schema": {"properties": {"b": {"type": "boolean"}}}}}
    ),
)
PARAMETERS = [
    "best_of",
    "temperature",
    "repetition_penalty",
    "frequency_penalty",
    "top_k",
    "top_p",
    "typical_p",
    "do_sample",
    "max_new_tokens",
    "return_full_text",
    "stop",
    "truncate",
    "watermark",
    "details",
    "decoder_input_details",
    "seed",
    "top_n_tokens",
    "grammar",
    "adapter_id",
]
parameters = st.dictionaries(
    st.sampled_from(PARAMETERS),
    st.one_of(scalars, grammars, st.lists(texts, max_size=6)),
    max_size=6,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "x"]),
            "content": st.one_of(texts, st.none(), values),
        }
    ),
    max_size=3,
)
bodies = st.one_of(
    st.fixed_dictionaries({"inputs": texts, "parameters": parameters}),
    st.fixed_dictionaries({"inputs": texts, "parameters": parameters, "stream": st.booleans()}),
    st.fixed_dictionaries(
        {
            "prompt": st.one_of(texts, st.lists(texts, max_size=6)),
            "max_tokens": st.one_of(ints, st.none()),
            "temperature": floats,
            "stream": st.booleans(),
            "seed": ints,
        }
    ),
    st.fixed_dictionaries(
        {
            "messages": messages,
            "max_tokens": st.one_of(ints, st.none()),
            "top_logprobs": ints,
            "logprobs": st.booleans(),
            "response_format": st.one_of(st.none(), grammars),
            "stream": st.booleans(),
        }
    ),
    values,
)


def encode(body, how: int) -> bytes:
    """A body as a client might send it: JSON (NaN and lone surrogates as Python writes them),
    cut short, or with bytes that are not UTF-8."""
    data = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: surrogates as \\udxxx
    if how == 1:
        return data[: len(data) // 2]
    if how == 2:
        return data.replace(b'"', b'"\xff', 1)
    return data


@given(route=st.sampled_from(POST_ROUTES), body=bodies, how=st.sampled_from([0, 0, 0, 0, 1, 2]))
@settings(
    max_examples=RAW_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_hostile_bodies_on_every_post_route(client, route, body, how):
    r = client.post(route, content=encode(body, how), headers={"Content-Type": "application/json"})
    check_answer(r.status_code, r.headers.get("content-type", ""), r.content)


def test_the_server_is_whole_after_the_fuzzing(client):
    """Runs last in this module: healthy, still generating, nothing left in flight, and no
    request ever failed inside the server."""
    print(f"fuzzing sent {SENT['requests']} requests")
    assert client.get("/health").status_code == 200
    r = client.post(
        "/generate",
        json={"inputs": "Still there?", "parameters": {"max_new_tokens": 5, "details": True}},
    )
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 5
    deadline = time.monotonic() + 10  # a slot is released just after its last token is sent
    while True:
        metrics = dict(
            line.rsplit(" ", 1)
            for line in client.get("/metrics").text.splitlines()
            if line[:1] != "#"
        )
        idle = [
            float(metrics[k])
            for k in ("tinycloud_requests_in_flight", "tgi_queue_size", "tgi_batch_current_size")
        ]
        if idle == [0, 0, 0] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle == [0, 0, 0]
    assert 'tgi_request_failure_total{err="internal"}' not in metrics, metrics
    assert 'tgi_request_failure_total{err="generation"}' not in metrics, metrics
