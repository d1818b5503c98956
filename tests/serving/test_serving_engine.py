"""The engine under the API: the hand-written GPT-2 pass against Hugging Face's, int8 against
fp32, EOS, and the scheduler's queue: overflow gets 429 and loses nothing, a client that leaves
mid-stream frees its slot. Servers here are real uvicorn instances in a thread, so the test can
hold the scheduler at a gate (``Engine.step_hook``) to make timing deterministic."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from conftest import wait_until
from serving_helpers import ThreadServer, build_eos_model, stream_events

from serving.model import load_model
from serving.server import create_app
from serving.settings import Settings

# --- the model pass -------------------------------------------------------------------------------


def test_runner_matches_transformers_prefill_decode_and_slot_moves(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    lm = load_model(str(tiny_model_dir), slots=3)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok, runner = lm.tokenizer, lm.runner
    a = tok("The quick brown fox jumps")["input_ids"]
    b = tok("A model")["input_ids"]

    def reference(ids):
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0]

    torch.testing.assert_close(runner.prefill(0, a, all_logits=True), reference(a))
    runner.prefill(1, b)
    out = runner.decode(torch.tensor([11, 22]), torch.tensor([len(a), len(b)]))
    torch.testing.assert_close(out[0], reference([*a, 11])[-1])
    torch.testing.assert_close(out[1], reference([*b, 22])[-1])
    runner.move(1, 0, len(b) + 1)  # b leaves slot 1 for slot 0, as when a finishes
    out = runner.decode(torch.tensor([33]), torch.tensor([len(b) + 1]))
    torch.testing.assert_close(out[0], reference([*b, 22, 33])[-1])
    c = tok("A modem")["input_ids"][: len(b)]
    assert len(c) == len(b)
    runner.prefill(1, c)
    out = runner.decode(torch.tensor([44, 55]), torch.tensor([len(b) + 2, len(c)]))
    torch.testing.assert_close(out[0], reference([*b, 22, 33, 44])[-1])
    runner.prefill(0, b)  # two sequences at one position: the unmasked path, as one stream
    out = runner.decode(torch.tensor([66, 77]), torch.tensor([len(b), len(c)]))
    torch.testing.assert_close(out[0], reference([*b, 66])[-1])
    torch.testing.assert_close(out[1], reference([*c, 77])[-1])


def test_int8_logits_stay_close_to_fp32(tiny_model_dir):
    fp32 = load_model(str(tiny_model_dir), slots=1)
    int8 = load_model(str(tiny_model_dir), slots=1, quantize="int8")
    assert int8.dtype == "torch.qint8"
    assert any("quantized" in type(m).__module__ for m in int8.runner.blocks[0].modules())
    ids = fp32.tokenizer("Fine-tuning teaches it a format, and the end token to stop.")["input_ids"]
    ref = fp32.runner.prefill(0, ids, all_logits=True)
    got = int8.runner.prefill(0, ids, all_logits=True)
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = torch.sum(p.exp() * (p - q), -1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert kl < 0.01, kl
    assert agree >= 0.9, agree


# --- EOS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_server(tiny_model_dir, tmp_path_factory):
    from conftest import free_port

    model = build_eos_model(tiny_model_dir, tmp_path_factory.mktemp("eos") / "model")
    settings = Settings(model=str(model))
    with ThreadServer(create_app(settings, load_model(str(model))), free_port()) as srv:
        yield srv


def test_eos_ends_generation(eos_server):
    with httpx.Client(base_url=eos_server.url, timeout=30) as c:
        body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 20, "details": True}}
        out = c.post("/generate", json=body).json()
        assert out["details"]["finish_reason"] == "eos_token"
        assert out["details"]["generated_tokens"] == 1
        eos = out["details"]["tokens"][0]
        assert eos["special"] is True and eos["text"] == "<|endoftext|>"
        assert out["generated_text"] == ""  # special tokens are not part of the text (TGI)
        _, events = stream_events(c, "/generate_stream", body)
        assert events[-1]["token"]["special"] is True
        assert events[-1]["details"]["finish_reason"] == "eos_token"
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "temperature": 0}
        reply = c.post("/v1/chat/completions", json=chat).json()
        assert reply["choices"][0]["finish_reason"] == "stop"  # OpenAI's word for EOS
        assert reply["choices"][0]["message"]["content"] == ""


# --- the queue ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot_server(tiny_model_dir):
    """One decoding slot and two places in the queue: the fourth request in flight gets 429."""
    from conftest import free_port

    settings = Settings(model=str(tiny_model_dir), max_batch_size=1, max_queued=2)
    loaded = load_model(settings.model, slots=1)
    with ThreadServer(create_app(settings, loaded), free_port()) as srv:
        yield srv


def test_full_queue_gets_429_and_queued_requests_complete(one_slot_server):
    srv, engine = one_slot_server, one_slot_server.engine
    gate = threading.Event()
    engine.step_hook = gate.wait  # the scheduler stops before its next model step

    async def scenario():
        body = {"inputs": "queued work", "parameters": {"max_new_tokens": 5, "details": True}}
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
            first = asyncio.ensure_future(ac.post("/generate", json=body))
            assert await asyncio.to_thread(wait_until, lambda: engine.in_flight == 1)
            queued = [asyncio.ensure_future(ac.post("/generate", json=body)) for _ in range(2)]
            assert await asyncio.to_thread(wait_until, lambda: engine.in_flight == 3)
            refused = await ac.post("/generate", json=body)
            refused_stream = await ac.post("/generate_stream", json=body)
            gate.set()
            return refused, refused_stream, await asyncio.gather(first, *queued)

    try:
        refused, refused_stream, answered = asyncio.run(scenario())
    finally:
        gate.set()
        engine.step_hook = None
    for r in (refused, refused_stream):
        assert r.status_code == 429
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert r.headers["retry-after"] == "1"
    assert [r.status_code for r in answered] == [200, 200, 200]
    assert all(r.json()["details"]["generated_tokens"] == 5 for r in answered)
    assert wait_until(lambda: engine.in_flight == 0)


def test_client_disconnect_mid_stream_frees_the_slot(one_slot_server):
    srv, engine = one_slot_server, one_slot_server.engine
    engine.step_hook = lambda: time.sleep(0.02)  # ~50 tokens/s: slow enough to leave midway
    steps_before = engine.steps
    try:
        body = {"inputs": "a long answer", "parameters": {"max_new_tokens": 200}}
        with (
            httpx.Client(base_url=srv.url, timeout=30) as c,
            c.stream("POST", "/generate_stream", json=body) as r,
        ):
            assert next(r.iter_lines()).startswith("data:")  # it is generating
        # leaving the block closed the connection after one token
        assert wait_until(lambda: engine.in_flight == 0, timeout=5)
        assert engine.steps - steps_before < 150  # stopped early, not run to 200
        engine.step_hook = None
        # the single slot is free again: the next request is served at once
        r = httpx.post(
            f"{srv.url}/generate",
            json={"inputs": "next", "parameters": {"max_new_tokens": 3}},
            timeout=30,
        )
        assert r.status_code == 200
    finally:
        engine.step_hook = None


def test_batched_top_k_samples_as_each_sequence_alone(tiny_model_dir):
    """Top-k samplers in one batch share one ``topk`` (Engine._shortlists); each still draws
    the tokens, with the log-probabilities, that it draws alone with its seed."""
    from serving.engine import Engine
    from serving.sampling import SamplingParams
    from serving.validation import GenerationSpec

    lm = load_model(str(tiny_model_dir), slots=4)
    prompts = ["Once upon a time", "The quick brown fox", "A model", "Fine-tuning teaches"]
    specs = [
        GenerationSpec(
            input_ids=lm.tokenizer(p)["input_ids"],
            max_new_tokens=12,
            stop=(),
            sampling=SamplingParams(do_sample=True, top_k=k, temperature=t),
            seed=100 + i,
        )
        for i, (p, k, t) in enumerate(
            zip(prompts, (5, 50, 20, 3), (1.0, 0.7, 1.3, 1.0), strict=True)
        )
    ]
    engine = Engine(lm, max_batch_size=4).start()
    shared: list[int] = []
    shortlists = engine._shortlists
    engine._shortlists = lambda active, logits: (
        shared.append(len(r := shortlists(active, logits))) or r
    )

    async def run(batch):
        return await asyncio.gather(*(s.result() for s in engine.submit(batch)))

    try:
        together = asyncio.run(run(specs))
        alone = [asyncio.run(run([spec]))[0] for spec in specs]
    finally:
        engine.close()
    assert max(shared) == 4  # all four shared one top-k
    for a, b in zip(together, alone, strict=True):
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_direct_ops_compute_what_the_modules_do():
    # The runner calls each layer's kernel directly (no nn.Module call machinery): the same
    # numbers as the module's own forward, for every kind of layer a GPT-2 step runs, fp32 and
    # int8; anything else is the module itself.
    import warnings

    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from serving.model import direct_op

    torch.manual_seed(0)
    x = torch.randn(5, 16)
    conv = Conv1D(24, 16)
    nn.init.normal_(conv.bias)
    linear, norm = nn.Linear(16, 24), nn.LayerNorm(16, eps=1e-3)
    nn.init.normal_(norm.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(nn.Linear(16, 24)), {nn.Linear}, dtype=torch.qint8
        )[0]
    with torch.inference_mode():
        for module in (conv, linear, norm, int8):
            fast = direct_op(module)
            assert fast is not module, type(module)
            torch.testing.assert_close(fast(x), module(x), rtol=0, atol=0)
    other = nn.GELU()
    assert direct_op(other) is other
