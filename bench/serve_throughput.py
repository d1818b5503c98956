"""Serving throughput: the native server over HTTP against plain ``transformers.generate``.

    uv run python bench/serve_throughput.py            # GPT-2 124M architecture, random weights
    uv run python bench/serve_throughput.py --quick    # 20 new tokens: a smoke run
    uv run python bench/serve_throughput.py --model runs/my-finetune/model   # a trained model

Same model, same run, same machine: a 32-token prompt, 100 new tokens, sampling (top-k 50).
Baseline: ``model.generate`` for one prompt, and for a batch of 8 (the better of torch's
default thread count and one thread). Server: ``python -m
serving.server`` in a subprocess, streamed over HTTP by 1 client, then by 8 at once; fp32 and
``--quantize int8`` separately, with the first token's latency (the median of 7 requests, timed
from the request on an open client). int8's quality cost is the
per-token KL divergence and top-1 agreement of int8 against fp32 on held-out text (and the
perplexity ratio, which only means something for a trained ``--model``). The last line is
``serve speedup: 1-stream X.Yx, 8-client Z.Zx`` (int8 server over the baseline).

The machine's facts come first (``bench/machine.py``: CPU, memory read bandwidth, matmul peak),
and each served figure is set against its memory-bandwidth bound on that machine: a decode step
reads every weight once (≈124 MB in int8, shared by the whole batch) and each sequence's KV
cache. Last, a profile table (``bench/serve_profile.py``): the share of a decode step's time
per phase, from the engine run in-process with a clock on each phase, and the HTTP/SSE share.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_TOKENS = 32  # prompt length
NEW_TOKENS = 100  # tokens generated per request
CLIENTS = 8  # concurrent clients in the batched run
TOP_K = 50  # the sampling both sides use (transformers' default top-k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus_text() -> str:
    files = sorted((ROOT / "remote" / "jobs" / "data" / "corpus").glob("*.txt"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def build_random_gpt2(out: Path) -> Path:
    """GPT-2 124M's architecture, randomly initialised (nothing downloaded), with a byte-level
    BPE trained on the shipped corpus; vocabulary padded to GPT-2's 50257 rows."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from remote.jobs.prompts import save_tokenizer_with_chat_format
    from remote.jobs.tokenizer import train_bpe

    tok = train_bpe([corpus_text()], vocab_size=8000)
    tok.add_tokens([f"<unused{i}>" for i in range(50257 - len(tok))])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    )
    save_tokenizer_with_chat_format(tok, out)
    model.save_pretrained(out)
    return out


def prompts(tokenizer, n: int) -> list[str]:
    tokenizer.model_max_length = 10**9  # the corpus is tokenized whole, then cut
    ids = tokenizer(corpus_text())["input_ids"]
    step = max(1, (len(ids) - PROMPT_TOKENS) // (n + 1))
    return [tokenizer.decode(ids[i * step : i * step + PROMPT_TOKENS]) for i in range(n)]


# --- baseline: plain transformers ---------------------------------------------------------------


def baseline(model_dir: Path, new_tokens: int) -> tuple[float, float]:
    """(tokens/s for one prompt, total tokens/s for a batch of 8) with ``model.generate``, the
    better of torch's default thread count and one thread for each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = prompts(tok, CLIENTS)
    kw = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        top_k=TOP_K,
        pad_token_id=tok.eos_token_id,
    )

    def run(batch: list[str]) -> float:
        enc = tok(batch, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, **kw)
        elapsed = time.perf_counter() - t
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(batch) / elapsed

    # transformers' default is a torch thread per core; on a small machine with anything else
    # running, one thread is often faster (OpenMP's barriers wait for descheduled workers).
    # The baseline is the better of the two for each figure: the ratios never flatter us.
    best = [0.0, 0.0]
    default = torch.get_num_threads()
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        run(texts[:1])  # warm-up
        best = [max(best[0], run(texts[:1])), max(best[1], run(texts))]
    torch.set_num_threads(default)
    return best[0], best[1]


# --- the native server over HTTP -------------------------------------------------------------


def start_server(model_dir: Path, port: int, quantize: bool) -> subprocess.Popen:
    import httpx

    args = [
        sys.executable,
        "-m",
        "serving.server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if quantize:
        args += ["--quantize", "int8"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError("server did not start")


def stream_one(
    client, url: str, prompt: str, new_tokens: int, seed: int
) -> tuple[int, float, float]:
    """(tokens, seconds to the first token, total seconds) for one streamed request, on an
    ``httpx.Client`` made beforehand: making one costs ~25 ms (its TLS context), which is the
    client's time, not the server's."""
    body = {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": new_tokens,
            "do_sample": True,
            "top_k": TOP_K,
            "seed": seed,
        },
    }
    t = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", f"{url}/generate_stream", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:"):
                tokens += 1
                first = first or time.perf_counter() - t
    return tokens, first or 0.0, time.perf_counter() - t


FIRST_TOKEN_TRIES = 7  # the first-token latency is the median of this many requests


def served(url: str, texts: list[str], new_tokens: int) -> tuple[float, float, float]:
    """(1-stream tok/s, its first-token latency, 8-client total tok/s)."""
    import statistics

    import httpx

    clients = [httpx.Client() for _ in range(CLIENTS)]
    try:
        one = clients[0]
        stream_one(one, url, texts[0], 4, 0)  # warm-up
        tokens, _, total = stream_one(one, url, texts[0], new_tokens, 1)
        firsts = [stream_one(one, url, texts[i % len(texts)], 2, 10 + i)[1]
                  for i in range(FIRST_TOKEN_TRIES)]  # fmt: skip
        results: list[tuple[int, float, float]] = []

        def client(i: int) -> None:
            results.append(stream_one(clients[i], url, texts[i], new_tokens, 100 + i))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    finally:
        for c in clients:
            c.close()
    return tokens / total, statistics.median(firsts), sum(r[0] for r in results) / wall


# --- int8's quality cost -----------------------------------------------------------------------


def int8_quality(model_dir: Path) -> tuple[float, float, float]:
    """(mean KL(fp32 || int8) per token, top-1 agreement, perplexity int8 / fp32) on the
    corpus's last 512 tokens, through the server's own model pass."""
    import torch

    from serving.model import load_model

    fp32 = load_model(str(model_dir), slots=1)
    int8 = load_model(str(model_dir), slots=1, quantize="int8")
    n = min(512, fp32.max_total_tokens)
    fp32.tokenizer.model_max_length = 10**9
    ids = fp32.tokenizer(corpus_text())["input_ids"][-n:]
    ref = torch.log_softmax(fp32.runner.prefill(0, ids, all_logits=True), -1)
    got = torch.log_softmax(int8.runner.prefill(0, ids, all_logits=True), -1)
    kl = torch.sum(ref.exp() * (ref - got), -1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    target = torch.tensor(ids[1:])
    nll = [-lp[:-1].gather(1, target[:, None]).mean().item() for lp in (ref, got)]
    return kl, agree, math.exp(nll[1] - nll[0])


def step_bytes(model_dir: Path, quantize: bool, streams: int, new_tokens: int) -> float:
    """Bytes one decode step must read: every matmul weight once (int8: 1 byte, fp32: 4; the
    LM head included), the small fp32 vectors, and each stream's KV cache at its mean length."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    e, layers = cfg.n_embd, cfg.n_layer
    matmul = layers * (e * 3 * e + e * e + 2 * e * 4 * e) + cfg.vocab_size * e
    vectors = layers * (3 * e + e + 4 * e + e + 4 * e) + 2 * e  # biases, layer norms
    span = PROMPT_TOKENS + new_tokens / 2
    kv = streams * 2 * layers * e * span * 4
    return matmul * (1 if quantize else 4) + vectors * 4 + kv


def bound_note(tok_s: float, bound: float) -> str:
    return f"{tok_s / bound:4.0%} of the {bound:5.0f} tok/s bandwidth bound"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a trained model dir (default: random GPT-2 124M)")
    p.add_argument("--quick", action="store_true", help="20 new tokens instead of 100")
    p.add_argument("--int8-only", action="store_true", help="skip the fp32 server (iterating)")
    args = p.parse_args()
    new_tokens = 20 if args.quick else NEW_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_random_gpt2(Path(tmp) / "gpt2-124m-random")
        from transformers import AutoTokenizer

        texts = prompts(AutoTokenizer.from_pretrained(model_dir), CLIENTS)
        from bench.machine import measure

        machine = measure()
        print(machine.line())
        print(
            f"model {model_dir.name}; prompt {PROMPT_TOKENS} tokens, {new_tokens} new, "
            f"sampling top-k {TOP_K}; {os.cpu_count()} cores"
        )
        base1, base8 = baseline(model_dir, new_tokens)
        print(
            f"baseline transformers.generate: 1 prompt {base1:6.1f} tok/s | "
            f"batch of {CLIENTS} {base8:6.1f} tok/s"
        )
        rows = {}
        for label, quantize in (("fp32", False), ("int8", True))[args.int8_only :]:
            port = free_port()
            proc = start_server(model_dir, port, quantize)
            try:
                rows[label] = served(f"http://127.0.0.1:{port}", texts, new_tokens)
            finally:
                proc.terminate()
                proc.wait(30)
            one, first, many = rows[label]
            bounds = [
                n * machine.bandwidth_gbs * 1e9 / step_bytes(model_dir, quantize, n, new_tokens)
                for n in (1, CLIENTS)
            ]
            print(
                f"native server {label}: 1 stream {one:6.1f} tok/s ({one / base1:.1f}x), "
                f"first token {first * 1000:5.0f} ms | {CLIENTS} clients {many:6.1f} tok/s "
                f"({many / base8:.1f}x)\n"
                f"  {label} against memory bandwidth: 1 stream {bound_note(one, bounds[0])}"
                f" | {CLIENTS} clients {bound_note(many, bounds[1])}"
            )
        kl, agree, ppl = int8_quality(model_dir)
        trained = "" if args.model else " (random weights: only the KL/agreement say anything)"
        print(
            f"int8 quality vs fp32: KL {kl:.4f} nats/token, top-1 agreement {agree:.1%}, "
            f"perplexity ratio {ppl:.3f}{trained}"
        )
        one, _, many = rows["int8"]
        from bench.serve_profile import profile_engine, table

        profiles = [
            profile_engine(str(model_dir), texts[:n], new_tokens, TOP_K) for n in (1, CLIENTS)
        ]
        print("profile of the int8 server, per decode step (in-process engine + HTTP runs above):")
        print(table(profiles, [one, many]))
        print(f"serve speedup: 1-stream {one / base1:.1f}x, {CLIENTS}-client {many / base8:.1f}x")


if __name__ == "__main__":
    main()
