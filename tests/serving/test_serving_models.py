"""Several models in one server (issue 17): a full fine-tune beside the base, a LoRA adapter over
the base, picked per request as TGI picks them; over HTTP against a real uvicorn.

The server serves ``base`` (the suite's tiny model; the server's own), ``full`` (another tiny
model with its own weights and a 128-token context), ``lora`` (a LoRA adapter over ``base``,
saved by finetune's own ``save_model``) and ``poison`` (``base`` with position 200's embedding
NaN). Every answer is checked against ``transformers`` running that model's weights (for
``lora``: the merged model finetune saves beside the adapter), so an answer from the wrong model
or a wrongly applied adapter cannot pass.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ROOT, build_tiny_model, free_port, wait_until
from serving_helpers import ThreadServer, stream_events

from serving import catalog, memory
from serving.server import create_app
from serving.settings import from_args

BASE, FULL, LORA, POISON = "base", "full", "lora", "poison"
POISONED_POSITION = 200
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tiny_lora_dir, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    full = build_tiny_model(root / FULL / "model", n_positions=128, seed=3)
    poison = root / POISON / "model"
    shutil.copytree(tiny_model_dir, poison)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.transformer.wpe.weight[POISONED_POSITION] = float("nan")
    model.save_pretrained(poison)
    return {BASE: tiny_model_dir, FULL: full, LORA: tiny_lora_dir, POISON: poison}


def served(argv: list[str]) -> ThreadServer:
    """``python -m serving.server``'s own steps (flags, plan, load), on a thread."""
    settings = from_args([*argv, "--threads", "1"])
    plan = catalog.plan(list(settings.served))
    loaded = catalog.load(plan, quantize=None, device="cpu", slots=settings.max_batch_size)
    return ThreadServer(create_app(settings, loaded), free_port())


@pytest.fixture(scope="module")
def server(dirs):
    argv = [f"--model={BASE}={dirs[BASE]}", f"--model={FULL}={dirs[FULL]}",
            f"--adapter={LORA}={dirs[LORA]}", f"--model={POISON}={dirs[POISON]}"]  # fmt: skip
    with served(argv) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(dirs):
    """``transformers`` greedy decoding of each id's weights: the tokens and their logprobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {i: AutoModelForCausalLM.from_pretrained(dirs[i]).eval() for i in (BASE, FULL, LORA)}
    tok = AutoTokenizer.from_pretrained(dirs[BASE])

    def greedy(model_id: str, prompt: str = PROMPT, n: int = 8) -> list[tuple[int, float]]:
        ids = tok(prompt)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(n):
                logprobs = torch.log_softmax(
                    models[model_id](torch.tensor([ids])).logits[0, -1], -1
                )
                token = int(logprobs.argmax())
                out.append((token, float(logprobs[token])))
                ids.append(token)
        return out

    return greedy


def tokens_of(body: dict) -> list[tuple[int, float]]:
    return [(t["id"], t["logprob"]) for t in body["details"]["tokens"]]


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return [t for t, _ in got] == [t for t, _ in want] and all(
        abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want, strict=True)
    )


def generate(client, model_id: str | None = None, prompt: str = PROMPT, **parameters):
    params = {"max_new_tokens": 8, "details": True, **parameters}
    if model_id is not None:
        params["adapter_id"] = model_id
    return client.post("/generate", json={"inputs": prompt, "parameters": params})


# --- what is served ---------------------------------------------------------------------------


def test_every_id_is_listed_and_described(server, client):
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [BASE, FULL, LORA, POISON]
    assert all(m["object"] == "model" and "prompt_format" in m for m in listed)
    info = client.get("/info").json()
    assert info["model_id"] == BASE and info["max_total_tokens"] == 256  # the server's own
    models = {m["id"]: m for m in info["models"]}
    assert list(models) == [BASE, FULL, LORA, POISON]
    assert models[LORA]["kind"] == "adapter" and models[LORA]["base"] == BASE
    assert models[FULL]["kind"] == "model" and models[FULL]["max_total_tokens"] == 128
    assert models[LORA]["max_total_tokens"] == 256  # the base's context
    # An adapter costs its A and B (2 layers x (64x4 + 4x192) fp32), not another base.
    assert models[LORA]["memory_bytes"] == 2 * (64 * 4 + 4 * 192) * 4
    assert models[BASE]["memory_bytes"] > 50 * models[LORA]["memory_bytes"]
    runner = {i: s.loaded.runner for i, s in server.app.state.service.served.items()}
    assert runner[LORA] is runner[BASE] and runner[FULL] is not runner[BASE]


def test_each_id_answers_with_its_own_weights(client, reference):
    own = tokens_of(generate(client).json())
    assert same(own, reference(BASE))
    for model_id in (BASE, FULL, LORA):
        r = generate(client, model_id)
        assert r.status_code == 200, r.text
        assert same(tokens_of(r.json()), reference(model_id)), model_id
    assert not same(reference(LORA), reference(BASE))  # the adapter does change the model
    # The same on the stream, the compat route and the /v1 routes (by `model`).
    _, events = stream_events(
        client, "/generate_stream",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "adapter_id": LORA}},
    )  # fmt: skip
    assert same([(e["token"]["id"], e["token"]["logprob"]) for e in events], reference(LORA))
    compat = client.post("/", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 8, "details": True, "adapter_id": FULL}})  # fmt: skip
    assert same(tokens_of(compat.json()[0]), reference(FULL))
    chat = client.post("/v1/chat/completions", json={
        "model": LORA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "temperature": 0})  # fmt: skip
    assert chat.status_code == 200 and chat.json()["model"] == LORA
    tgi = client.post("/v1/completions", json={"model": "tgi", "prompt": PROMPT, "max_tokens": 8,
                                               "temperature": 0})  # fmt: skip
    as_base = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                   "temperature": 0})  # fmt: skip
    assert tgi.json()["model"] == BASE and tgi.json()["choices"] == as_base.json()["choices"]
    as_full = client.post("/v1/completions", json={"model": FULL, "prompt": PROMPT,
                                                   "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert as_full.json()["model"] == FULL
    assert as_full.json()["choices"][0]["text"] == generate(client, FULL).json()["generated_text"]


def test_an_unknown_id_is_tgis_422(client):
    """TGI 3.3 would answer from its base model; issue 17 asks for a 422, so a typo in a
    comparison never shows the base's answer under another model's name."""
    want = (
        "Input validation error: `adapter_id` 'nope' is not served here; this server serves "
        f"'{BASE}', '{FULL}', '{LORA}', '{POISON}' (GET /v1/models lists them)"
    )
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "nope", "max_new_tokens": 2}}
    for path in ("/generate", "/generate_stream", "/", "/tokenize"):
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json() == {"error": want, "error_type": "validation"}, path
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, request in [
        ("/v1/chat/completions", chat),
        ("/chat_tokenize", chat),
        ("/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2}),
    ]:
        r = client.post(path, json=request)
        assert r.status_code == 422 and r.json() == {"error": want, "error_type": "validation"}


def test_each_id_keeps_its_own_context_and_tokenizer(client, dirs):
    from transformers import AutoTokenizer

    r = generate(client, FULL, max_new_tokens=200)
    assert r.status_code == 422
    assert "`inputs` tokens + `max_new_tokens` must be <= 128" in r.json()["error"]
    assert generate(client, LORA, max_new_tokens=200).status_code == 200  # 256 tokens
    counted = client.post("/tokenize", json={"inputs": PROMPT, "parameters": {"adapter_id": FULL}})
    want = AutoTokenizer.from_pretrained(dirs[FULL])(PROMPT)["input_ids"]
    assert [t["id"] for t in counted.json()] == want
    huge = {"inputs": "x" * 300_000, "parameters": {"adapter_id": FULL}}
    r = client.post("/tokenize", json=huge)
    assert r.status_code == 422 and "/tokenize lists at most 2048" in r.json()["error"]  # 16 x 128


# --- batching across models, and failures that stay where they happen -------------------------


def held(engine, n: int):
    """Hold the scheduler until ``n`` requests are in flight, so they start together."""
    gate = threading.Event()
    engine.step_hook = gate.wait
    return gate


def test_requests_for_different_models_decode_together(server, reference):
    engine = server.engine
    service = server.app.state.service
    base_runner = service.served[BASE].loaded.runner
    lora_index = service.served[LORA].loaded.adapter
    seen: list[list[int] | None] = []
    real_decode = base_runner.decode

    def watched(tokens, positions, adapters=None):
        seen.append(adapters)
        return real_decode(tokens, positions, adapters)

    base_runner.decode = watched
    gate = held(engine, 6)
    steps = engine.steps
    order = [BASE, LORA, FULL, LORA, BASE, FULL]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            body = lambda m: {"inputs": PROMPT, "parameters": {  # noqa: E731
                "max_new_tokens": 8, "details": True, "adapter_id": m}}  # fmt: skip
            asks = [asyncio.ensure_future(ac.post("/generate", json=body(m))) for m in order]
            assert await asyncio.to_thread(wait_until, lambda: engine.in_flight == 6)
            gate.set()
            return await asyncio.gather(*asks)

    try:
        answers = asyncio.run(scenario())
    finally:
        gate.set()
        engine.step_hook = None
        base_runner.decode = real_decode
    for model_id, r in zip(order, answers, strict=True):
        assert same(tokens_of(r.json()), reference(model_id)), model_id
    # base and lora rows in the same decode steps of the base's weights; full in its own steps
    assert any(a is not None and 0 in a and lora_index in a for a in seen), seen
    assert max(len(a) for a in seen if a) == 4
    # continuous batching: about 7 decode steps (after the prefill's token) per model, not per
    # request (the first request may decode one step alone before the others are admitted)
    assert engine.steps - steps <= 2 * 7 + 2


def test_a_failure_stays_with_its_sequence_and_its_model(server, client, reference):
    """poison's sequence reaches the NaN position and fails alone (TGI's 424); then full's
    whole decode step fails, and only full's requests with it: base and lora decode on."""
    engine, service = server.engine, server.app.state.service
    tok = service.served[POISON].loaded.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. " * 30)["input_ids"][:210]
    long_prompt = tok.decode(ids)
    full_runner = service.served[FULL].loaded.runner

    def run(asks: list[tuple[str, str]]) -> list[httpx.Response]:
        gate = held(engine, len(asks))

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
                params = {"max_new_tokens": 8, "details": True}
                futures = [
                    asyncio.ensure_future(
                        ac.post(
                            "/generate",
                            json={"inputs": p, "parameters": {**params, "adapter_id": m}},
                        )
                    )
                    for m, p in asks
                ]
                assert await asyncio.to_thread(wait_until, lambda: engine.in_flight == len(asks))
                gate.set()
                return await asyncio.gather(*futures)

        try:
            return asyncio.run(scenario())
        finally:
            gate.set()
            engine.step_hook = None

    poison, lora, base = run([(POISON, long_prompt), (LORA, PROMPT), (BASE, PROMPT)])
    assert poison.status_code == 424 and poison.json()["error_type"] == "generation"
    assert same(tokens_of(lora.json()), reference(LORA))
    assert same(tokens_of(base.json()), reference(BASE))

    def broken(*args, **kwargs):
        raise RuntimeError("injected: full's batched step failed")

    full_runner.decode = broken
    try:
        full1, lora, full2, base = run(
            [(FULL, PROMPT), (LORA, PROMPT), (FULL, "x"), (BASE, PROMPT)]
        )
    finally:
        del full_runner.decode  # back to the class's method
    for r in (full1, full2):
        assert r.status_code == 424 and "full's batched step failed" in r.json()["error"]
    assert same(tokens_of(lora.json()), reference(LORA))
    assert same(tokens_of(base.json()), reference(BASE))
    assert wait_until(lambda: engine.in_flight == 0)
    assert same(tokens_of(generate(client, FULL).json()), reference(FULL))  # full serves again


# --- an adapter over a base that is not served by itself ---------------------------------------


def test_an_adapter_alone_brings_its_base_unlisted(dirs, reference):
    plan = catalog.plan([catalog.Spec("adapter", str(dirs[LORA]))])
    assert plan.order == [dirs[LORA].parent.name]  # named after its run: runs/<run>/model
    [(base, listed)] = [(e.id, e.listed) for e in plan.entries if e.kind == "model"]
    assert not listed and base == dirs[BASE].parent.name
    with served([f"--adapter={LORA}={dirs[LORA]}"]) as srv, httpx.Client(base_url=srv.url) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [LORA]
        info = c.get("/info").json()
        assert info["model_id"] == LORA and [m["id"] for m in info["models"]] == [LORA]
        assert same(tokens_of(generate(c).json()), reference(LORA))  # no adapter_id: its own
        r = generate(c, base)
        assert r.status_code == 422  # the base is loaded, not served under an id


# --- the command line: ids, refusals, and the memory plan --------------------------------------


def server_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )


def test_the_plan_names_every_id_and_its_memory(dirs):
    r = server_cli("--model", f"{BASE}={dirs[BASE]}", "--adapter", f"{LORA}={dirs[LORA]}",
                   "--model", str(dirs[FULL]), "--plan")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"serving {BASE}, {LORA}, full (the first is the default)"
    assert (
        "KV cache (8 slots)" in r.stdout and f"LoRA rank 4 on attn.c_attn over {BASE}" in r.stdout
    )
    assert lines[-1].startswith("memory plan: ") and "available (" in lines[-1]


def test_a_plan_that_does_not_fit_is_refused_before_loading(dirs):
    shape = catalog.read_shape(str(dirs[BASE]))
    one = memory.weight_bytes(shape, None) + memory.kv_bytes(shape, 8)
    limit = (memory.RUNTIME_BYTES + one + 2**20) / memory.GIB  # room for one model, not two
    start = time.monotonic()
    r = server_cli("--model", f"a={dirs[BASE]}", "--model", f"b={dirs[POISON]}",
                   "--memory-limit-gb", f"{limit:.6f}")  # fmt: skip
    took = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    err = r.stderr
    assert err.startswith("error: the models asked for need ") and "(--memory-limit-gb):" in err
    assert "  a  " in err and "  b  " in err and "  runtime  800.0 MiB" in err
    assert "What fits: a (" in err and re.search(r"all of them with --max-batch-size [1-7]\b", err)
    assert "Loading weights" not in err and "Started server" not in err  # nothing was loaded
    assert took < 60, took


def test_bad_ids_and_adapters_are_refused_with_what_to_do(dirs, tmp_path):
    r = server_cli("--model", f"x={dirs[BASE]}", "--model", f"x={dirs[FULL]}", "--plan")
    assert r.returncode == 1 and "two models would both be served as x" in r.stderr
    r = server_cli("--model", f"bad id={dirs[BASE]}", "--plan")
    assert r.returncode == 2 and "the id 'bad id' must be letters, digits" in r.stderr
    r = server_cli("--adapter", str(dirs[FULL]), "--plan")
    assert r.returncode == 1 and "no LoRA adapter there" in r.stderr
    assert "A full fine-tune is served with --model" in r.stderr
    dora = tmp_path / "dora" / "model"
    shutil.copytree(dirs[LORA], dora)
    config = json.loads((dora / "adapter" / "adapter_config.json").read_text())
    (dora / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    r = server_cli("--adapter", str(dora), "--plan")
    assert r.returncode == 1 and "uses DoRA, which this server does not run" in r.stderr
    assert f"serve the run's merged model instead (--model ID={dora})" in r.stderr
    moved = tmp_path / "moved" / "model"
    shutil.copytree(dirs[LORA], moved)
    (moved / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "runs/gone/model"})
    )
    r = server_cli("--adapter", str(moved), "--plan")
    assert r.returncode == 1 and "was trained on runs/gone/model" in r.stderr
    assert "Start the server where the training ran" in r.stderr
    r = server_cli("--plan")
    assert r.returncode == 2 and "name a model to serve" in r.stderr


# --- the estimate ----------------------------------------------------------------------------


def test_the_estimate_matches_the_loaded_model(dirs):
    from transformers import AutoModelForCausalLM

    from serving.model import load_model

    shape = catalog.read_shape(str(dirs[FULL]))
    model = AutoModelForCausalLM.from_pretrained(dirs[FULL])
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    loaded = load_model(str(dirs[FULL]), slots=3)
    runner = loaded.runner
    cache = runner.k.numel() + runner.v.numel() + runner.scratch.numel()
    assert memory.kv_bytes(shape, 3) == cache * 4
    gpt2 = memory.shape_of({})  # GPT-2 124M's defaults
    assert gpt2.parameters == 124_439_808
    assert memory.kv_bytes(gpt2, 8) == 629_145_600  # 75 MiB a slot of 1024 tokens, scratch too
