"""Where a decode step's time goes: the native engine in-process, with a clock on each phase.

``bench/serve_throughput.py`` prints this table after its HTTP runs, so the next optimisation
starts from data. The engine runs exactly as in the server (its scheduler thread, its event
loop side, the same sampling), with timers wrapped around the model's pieces; what the HTTP
run took beyond the in-process run is the HTTP/SSE share (FastAPI, uvicorn, JSON, the socket).

Phases are exclusive: a matmul inside the prefill counts as prefill, not as a matmul.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# (row label, the phase names it sums), in the order a token is made
ROWS = (
    ("tokenize + prefill (per token of output)", ("prefill",)),
    ("layer matmuls: qkv + attention out", ("attn_matmul",)),
    ("layer matmuls: MLP", ("mlp_matmul",)),
    ("attention over the KV cache", ("attention",)),
    ("layer norms, GELU, residuals, KV writes", ("decode_other",)),
    ("lm_head (int8 50257 x 768)", ("lm_head",)),
    ("sampling (top-k, multinomial)", ("sampling",)),
    ("engine bookkeeping (detokenize, post)", ("bookkeeping",)),
    ("scheduler waits, GIL, event loop", ("idle",)),
)


class PhaseClock:
    """Exclusive wall time per phase, from perf_counter around wrapped callables."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self._stack: list[list[float]] = []  # per open phase: [time spent in children]
        self._names: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._names and self._names[-1] == "prefill":  # a prefill's insides are prefill
                return fn(*args, **kwargs)
            self._stack.append([0.0])
            self._names.append(name)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t
                children = self._stack.pop()[0]
                self._names.pop()
                self.seconds[name] += elapsed - children
                if self._stack:
                    self._stack[-1][0] += elapsed

        return timed


@contextmanager
def _patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def instrument(engine: Any, clock: PhaseClock) -> list[tuple[Any, str, Any]]:
    """Wrap the runner's pieces (instance attributes, so only this engine is touched)."""
    runner = engine.loaded.runner
    patches: list[tuple[Any, str, Any]] = [
        (runner, "prefill", clock.wrap("prefill", runner.prefill)),
        (runner, "decode", clock.wrap("decode_other", runner.decode)),
        (runner, "head", clock.wrap("lm_head", runner.head)),
        (runner, "_attend", clock.wrap("attention", runner._attend)),
        (engine, "_accept", clock.wrap("bookkeeping", engine._accept)),
        (engine, "_drop_finished", clock.wrap("bookkeeping", engine._drop_finished)),
        (engine, "_decode", clock.wrap("bookkeeping", engine._decode)),
    ]
    for ops in runner.ops:
        for attr, name in (
            ("c_attn", "attn_matmul"),
            ("attn_proj", "attn_matmul"),
            ("c_fc", "mlp_matmul"),
            ("mlp_proj", "mlp_matmul"),
        ):
            patches.append((ops, attr, clock.wrap(name, getattr(ops, attr))))
    return patches


@dataclass
class Profile:
    streams: int
    tokens: int  # generated, all streams together
    steps: int  # decode steps the engine ran
    wall: float
    seconds: dict[str, float]

    def per_step_ms(self, phases: tuple[str, ...]) -> float:
        return sum(self.seconds.get(p, 0.0) for p in phases) / max(self.steps, 1) * 1000


def profile_engine(model_dir: str, texts: list[str], new_tokens: int, top_k: int) -> Profile:
    """Run ``len(texts)`` streams together through a real Engine, timing each phase."""
    import torch

    from serving.server import configure_threads

    threads = torch.get_num_threads()
    configure_threads(None)  # the server's own thread count
    try:
        return _profile(model_dir, texts, new_tokens, top_k)
    finally:
        torch.set_num_threads(threads)


def _profile(model_dir: str, texts: list[str], new_tokens: int, top_k: int) -> Profile:
    from serving import engine as engine_module
    from serving.engine import Engine
    from serving.model import load_model
    from serving.sampling import SamplingParams
    from serving.validation import GenerationSpec

    loaded = load_model(model_dir, quantize="int8", slots=max(len(texts), 1))
    engine = Engine(loaded, max_batch_size=max(len(texts), 1)).start()
    sampling = SamplingParams(do_sample=True, top_k=top_k)

    async def run_all() -> int:
        specs = [
            GenerationSpec(
                input_ids=loaded.tokenizer(t)["input_ids"],
                max_new_tokens=new_tokens,
                stop=(),
                sampling=sampling,
                seed=i,
            )
            for i, t in enumerate(texts)
        ]
        streams = engine.submit(specs)
        ends = await asyncio.gather(*(s.result() for s in streams))
        return sum(e.generated_tokens for e in ends)

    try:
        asyncio.run(run_all())  # warm-up, untimed
        clock = PhaseClock()
        patches = instrument(engine, clock)
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        steps = engine.steps
        with _patched(engine_module, "choose", clock.wrap("sampling", engine_module.choose)):
            t = time.perf_counter()
            tokens = asyncio.run(run_all())
            wall = time.perf_counter() - t
    finally:
        engine.close()
    seconds = dict(clock.seconds)
    seconds["idle"] = max(0.0, wall - sum(seconds.values()))
    return Profile(len(texts), tokens, engine.steps - steps, wall, seconds)


def table(profiles: list[Profile], http_tok_s: list[float]) -> str:
    """Per phase: ms per decode step and its share of the HTTP run's time per step (of the
    in-process run's, if that was the slower: load on the machine moves both)."""
    head = "| phase | " + " | ".join(f"{p.streams} stream(s): ms/step, share" for p in profiles)
    lines = [head + " |", "|---" * (len(profiles) + 1) + "|"]
    engine_ms = [p.wall / max(p.steps, 1) * 1000 for p in profiles]
    http_ms = [
        max(p.streams / r * 1000, e)
        for p, r, e in zip(profiles, http_tok_s, engine_ms, strict=True)
    ]
    rows = [(label, [p.per_step_ms(ph) for p in profiles]) for label, ph in ROWS]
    rows.append(
        (
            "HTTP/SSE (HTTP run minus in-process run)",
            [max(0.0, h - e) for h, e in zip(http_ms, engine_ms, strict=True)],
        )
    )
    for label, values in rows:
        cells = [f"{v:6.2f} {v / h:6.1%}" for v, h in zip(values, http_ms, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    total = [f"{h:6.2f} 100.0%" for h in http_ms]
    lines.append("| **one step over HTTP** | " + " | ".join(total) + " |")
    lines.append(
        "in-process: "
        + ", ".join(f"{p.streams} stream(s) {p.tokens / p.wall:.1f} tok/s" for p in profiles)
    )
    return "\n".join(lines)
