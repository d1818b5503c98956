"""The generation engine: one scheduler thread decoding every active request together.

Requests arrive from the event loop (``Engine.submit``) as validated ``GenerationSpec``s and wait
in a bounded queue; the scheduler admits them into free KV-cache slots between decode steps
(continuous batching), runs one batched step for all of them, picks each sequence's next token
with its own sampling settings (and its own grammar, if it has one), and posts the token back to
the request's asyncio queue. A sequence ends on ``max_new_tokens`` (``length``), on EOS
(``eos_token``) or when a stop sequence appears in its text (``stop_sequence``, matched on text,
so across token boundaries), checked in that order as TGI does; a cancelled request (client
gone) is dropped at the next step and its slot reused.

Several models: each request names the one it runs on (a ``LoadedModel``; ``submit``'s
``model``). Sequences on one model's weights — the model itself and every LoRA adapter over it —
share that model's KV-cache slots and decode in one batched step (each adapter adds its own
low-rank term to its own rows); models with weights of their own decode in a step each, one
after the other in the same round. ``max_batch_size`` bounds the sequences decoding across all
of them, and every model has that many slots, so any mix fits.

A failure inside one sequence — its prefill, its sampling, its grammar, its detokenizing — ends
that sequence alone: its client gets TGI's generation error and the batch decodes on. Only a
failure of a batched model step itself fails every sequence in it (that model's, not the other
models'); the scheduler then carries on with the next requests.

Everything torch happens on the scheduler thread; the event loop only waits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from facts import FinishReason
from serving import constants as C
from serving.model import LoadedModel
from serving.sampling import choose
from serving.validation import GenerationSpec

log = logging.getLogger("serving.engine")


class Overloaded(RuntimeError):
    """Every slot is busy and the queue is full: the client should retry later (429)."""


class GenerationFailed(RuntimeError):
    """The model (or the sampler) failed on this request: TGI's 424 ``generation`` error."""


@dataclass(frozen=True)
class TokenOut:
    id: int
    text: str
    logprob: float
    special: bool
    top: tuple[TokenOut, ...] = ()  # the likeliest alternatives, when top_n_tokens was asked


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    generated_text: str
    generated_tokens: int
    seed: int | None  # None when decoding was greedy (TGI reports no seed then)
    input_length: int
    tokens: list[TokenOut] = field(default_factory=list)
    prefill: list[tuple[int, str, float | None]] = field(default_factory=list)
    queued: float = 0.0  # time.perf_counter() when it was queued, and when its prefill began
    started: float = 0.0

    @property
    def mean_logprob(self) -> float:
        """What ``best_of`` ranks sequences by (TGI: the mean of the tokens' log-probabilities)."""
        return sum(t.logprob for t in self.tokens) / max(len(self.tokens), 1)


class _Detokenizer:
    """Incremental decoding with TGI's offsets trick: a token whose bytes do not yet make whole
    characters yields "" and its text arrives with a later token."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        after = decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


def _plain_top_k(seq: _Sequence, vocab: int) -> bool:
    """Sampling whose first step is top-k over the raw logits (nothing needs the whole row)."""
    p = seq.spec.sampling
    return (
        p.sampling
        and 0 < p.top_k < vocab
        and not p.watermark
        and not p.penalized
        and seq.constraint is None
        and not seq.spec.top_n_tokens
    )


class Stream:
    """The event loop's handle on one request: iterate ``events()``; ``cancel()`` frees it."""

    def __init__(self, seq: _Sequence) -> None:
        self._seq = seq

    async def events(self) -> AsyncIterator[tuple[TokenOut, Finished | None]]:
        """(token, None) for each token; the last token comes with its ``Finished``."""
        queue = self._seq.queue
        while True:
            token, end = await queue.get()
            if isinstance(end, BaseException):
                raise GenerationFailed(str(end) or type(end).__name__) from end
            yield token, end
            if end is not None:
                return

    async def result(self) -> Finished:
        async for _, end in self.events():
            if end is not None:
                return end
        raise GenerationFailed("generation ended without a result")  # pragma: no cover

    def cancel(self) -> None:
        self._seq.cancelled = True  # the scheduler drops it before its next step

    @property
    def input_length(self) -> int:
        return len(self._seq.spec.input_ids)


class _Sequence:
    def __init__(
        self,
        spec: GenerationSpec,
        model: LoadedModel,
        loop: asyncio.AbstractEventLoop,
        constraint: Any,
        special: frozenset[int],
        outbox: list[tuple[_Sequence, tuple[Any, Any]]],
    ):
        import torch

        self.spec = spec
        self.model = model
        self.special = special  # the model's special token ids
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.released = False  # its place in the engine's capacity given back
        self.slot = -1
        self.pos = 0
        self.next_token = -1
        self.generated: list[int] = []
        self.tokens: list[TokenOut] = []
        self.prefill: list[tuple[int, str, float | None]] = []
        self.text = ""
        self.detok = _Detokenizer(model.tokenizer, spec.input_ids)
        device = model.runner.device  # multinomial wants its generator beside the logits
        self.generator = torch.Generator(device=device).manual_seed(spec.seed)
        self.constraint = constraint  # grammar.Constraint or None
        self.queued = time.perf_counter()
        self.started = 0.0
        self.failed = False  # its slot's cache may hold garbage (NaN): cleared when it leaves
        self.outbox = outbox  # the engine's: delivered to the event loop once a step

    def post(self, token: TokenOut | None, end: Finished | BaseException | None) -> None:
        """Queue an event for the event loop; the engine delivers a step's events together."""
        self.outbox.append((self, (token, end)))


def _deliver(events: list[tuple[_Sequence, tuple[Any, Any]]]) -> None:
    """On the event loop: hand each sequence its events (one wake-up for a whole step)."""
    for seq, event in events:
        seq.queue.put_nowait(event)


class _Group:
    """The sequences decoding on one model's weights (the model's own and its adapters'),
    packed into that runner's slots ``0..len(active)-1``."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.active: list[_Sequence] = []


class Engine:
    """Owns the models and the scheduler thread. ``submit`` from the event loop thread only.
    ``models``: one ``LoadedModel`` or several (the first is the default)."""

    def __init__(
        self,
        models: LoadedModel | Sequence[LoadedModel],
        *,
        max_batch_size: int = C.MAX_BATCH_SIZE,
        max_queued: int = C.MAX_QUEUED,
    ) -> None:
        models = [models] if isinstance(models, LoadedModel) else list(models)
        for m in models:
            if max_batch_size > m.runner.slots:
                raise ValueError(f"max_batch_size {max_batch_size} > {m.runner.slots} slots")
        self.loaded = models[0]
        self.models = models
        self.max_batch_size = max_batch_size
        self.capacity = max_batch_size + max_queued
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._groups: dict[int, _Group] = {}
        for m in models:
            self._groups.setdefault(id(m.runner), _Group(m.runner))
        self._in_flight = 0
        self._stopping = False
        self._special = {id(m): frozenset(m.tokenizer.all_special_ids) for m in models}
        self._outbox: list[tuple[_Sequence, tuple[Any, Any]]] = []  # events not yet delivered
        self._thread = threading.Thread(target=self._run, name="serving-scheduler", daemon=True)
        self.steps = 0  # decode steps run (a test and /metrics read it)
        self.step_hook: Callable[[], None] | None = None  # called before each model step
        self.sample_hook: Callable[[_Sequence], None] | None = None  # before each token choice

    # -- event loop side ---------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(
        self,
        specs: list[GenerationSpec],
        constraints: list[Any] | None = None,
        model: LoadedModel | None = None,
    ) -> list[Stream]:
        """Queue ``specs`` on ``model`` (the default one if None) together: all get a place,
        or none does (429)."""
        loop = asyncio.get_running_loop()
        model = model or self.loaded
        special = self._special.get(id(model)) or frozenset(model.tokenizer.all_special_ids)
        constraints = constraints or [None] * len(specs)
        seqs = [
            _Sequence(s, model, loop, c, special, self._outbox)
            for s, c in zip(specs, constraints, strict=True)
        ]
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise GenerationFailed("the generation engine is not running")
            if self._in_flight + len(seqs) > self.capacity:
                raise Overloaded("Model is overloaded")
            self._in_flight += len(seqs)
            self._waiting.extend(seqs)
            self._cond.notify()
        return [Stream(seq) for seq in seqs]

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return sum(len(g.active) for g in self._groups.values())

    @property
    def _active(self) -> list[_Sequence]:
        """Every sequence decoding, whichever model it is on."""
        return [s for g in self._groups.values() for s in g.active]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # -- scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            admit = self._next_admissions()
            if admit is None:
                return
            try:
                self._round(admit)
            except Exception as e:  # a bug between sequences: end this batch, keep serving
                log.exception("scheduler step failed; failing its %d sequences", len(admit))
                self._fail_all(admit, e)
            finally:
                self._flush()

    def _flush(self) -> None:
        """Deliver the events posted since the last flush: one ``call_soon_threadsafe`` per
        event loop, not one per token (each is a wake-up of the loop and a pipe write; eight
        per step cost the loop, and the GIL the scheduler shares with it, measurably)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, tuple[Any, Any]]]] = {}
        for item in self._outbox:
            by_loop.setdefault(item[0].loop, []).append(item)
        self._outbox.clear()
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                for seq, _ in events:
                    seq.cancelled = True

    def _round(self, admit: list[_Sequence]) -> None:
        for seq in admit:
            self._isolated(seq, self._prefill, seq)
        self._flush()  # first tokens now, not after the next decode step
        self._drop_finished()
        for group in self._groups.values():
            if not group.active:
                continue
            try:
                logits = self._decode(group)
            except Exception as e:  # the batched model step: its sequences share the fate
                log.exception("decode step failed; failing its %d requests", len(group.active))
                self._fail(group.active, e)
                continue
            shortlists = self._shortlists(group.active, logits)
            for i, seq in enumerate(group.active):
                seq.pos += 1
                if not seq.cancelled:
                    self._isolated(seq, self._accept, seq, logits[i], shortlists.get(i))
        self._drop_finished()

    def _shortlists(self, active: list[_Sequence], logits: Any) -> dict[int, tuple[Any, Any]]:
        """Each plain top-k sampler's top-k, from one ``topk`` over the batch rather than one
        per row over 50k logits (bench/serve_profile.py's sampling row). Rows with a
        warper that must see every logit first (penalties, watermark, grammar, top_n) keep
        their own path."""
        import torch

        vocab = logits.shape[-1]
        rows = [i for i, seq in enumerate(active) if not seq.cancelled and _plain_top_k(seq, vocab)]
        if len(rows) < 2:
            return {}
        ks = [active[i].spec.sampling.top_k for i in rows]
        try:
            values, ids = torch.topk(logits[rows], max(ks))  # sorted, descending, per row
        except Exception:  # each row then takes its own path, and fails alone if it must
            log.exception("batched top-k failed; sampling row by row")
            return {}
        pairs = enumerate(zip(rows, ks, strict=True))
        return {i: (values[j, :k], ids[j, :k]) for j, (i, k) in pairs}

    def _isolated(self, seq: _Sequence, fn: Callable[..., None], *args: Any) -> None:
        """Run one sequence's part of a step; if it fails, only that sequence ends."""
        try:
            fn(*args)
        except Exception as e:
            log.exception(
                "a sequence failed after %d tokens; the batch goes on", len(seq.generated)
            )
            seq.done = seq.failed = True
            seq.post(None, e)
            if seq.slot < 0:  # it never took a slot
                self._release([seq])

    def _next_admissions(self) -> list[_Sequence] | None:
        with self._cond:
            while not self._stopping and not self._waiting and not self.batch_size:
                self._cond.wait()
            if self._stopping:
                return None
            admit: list[_Sequence] = []
            free = self.max_batch_size - self.batch_size
            while free > 0 and self._waiting:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    seq.released = True
                    self._in_flight -= 1
                    continue
                admit.append(seq)
                free -= 1
            return admit

    def _prefill(self, seq: _Sequence) -> None:
        if self.step_hook:
            self.step_hook()
        seq.started = time.perf_counter()
        model = seq.model
        group = self._groups[id(model.runner)]
        ids = seq.spec.input_ids
        seq.slot = len(group.active)
        group.active.append(seq)
        logits = model.runner.prefill(
            seq.slot, ids, all_logits=seq.spec.prefill_details, adapter=model.adapter
        )
        seq.pos = len(ids)
        if seq.spec.prefill_details:
            seq.prefill = self._prefill_tokens(seq, ids, logits)
        self._accept(seq, logits[-1])

    def _decode(self, group: _Group) -> Any:
        import torch

        if self.step_hook:
            self.step_hook()
        active, runner = group.active, group.runner
        tokens = torch.tensor([s.next_token for s in active], device=runner.device)
        positions = torch.tensor([s.pos for s in active], device=runner.device)
        adapters = [s.model.adapter for s in active] if len(runner.adapters) > 1 else None
        logits = runner.decode(tokens, positions, adapters)
        self.steps += 1
        return logits

    def _accept(
        self, seq: _Sequence, logits: Any, shortlist: tuple[Any, Any] | None = None
    ) -> None:
        if self.sample_hook:
            self.sample_hook(seq)
        spec = seq.spec
        # the prompt + output list is only built when a penalty needs it (a copy per token)
        context = spec.input_ids + seq.generated if spec.sampling.penalized else spec.input_ids
        allowed = seq.constraint.allowed(logits.shape[-1]) if seq.constraint else None
        choice = choose(
            logits,
            spec.sampling,
            seq.generator,
            context,
            seq.generated,
            allowed=allowed,
            top_n=spec.top_n_tokens,
            shortlist=shortlist,
        )
        token = choice.token
        if not math.isfinite(choice.logprob):  # NaN or inf anywhere in the row ends up here
            raise RuntimeError("the model produced non-finite logits for this sequence")
        if seq.constraint:
            seq.constraint.advance(token)
        seq.generated.append(token)
        special = token in seq.special
        text = seq.detok.push(token)
        top = tuple(self._alternative(seq, i, lp) for i, lp in choice.top)
        out = TokenOut(token, text, choice.logprob, special, top)
        seq.tokens.append(out)  # for details=true; a few dozen bytes a token
        reason = None
        if len(seq.generated) >= spec.max_new_tokens:
            reason = FinishReason.LENGTH
        elif token in seq.model.eos_token_ids:
            reason = FinishReason.EOS
        elif spec.stop and not special:
            start = max(0, len(seq.text) - max(map(len, spec.stop)) + 1)
            seq.text += text
            if any(stop in seq.text[start:] for stop in spec.stop):
                reason = FinishReason.STOP
        if reason is None:
            seq.next_token = token
            seq.post(out, None)
            return
        seq.done = True
        seq.post(out, self._finished(seq, reason))

    def _alternative(self, seq: _Sequence, token: int, logprob: float) -> TokenOut:
        """One of the top-n tokens, decoded on its own as TGI does."""
        text = seq.model.tokenizer.decode([token], skip_special_tokens=False)
        return TokenOut(token, text, logprob, token in seq.special)

    def _finished(self, seq: _Sequence, reason: str) -> Finished:
        text = seq.model.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return Finished(
            finish_reason=reason,
            generated_text=text,
            generated_tokens=len(seq.generated),
            seed=seq.spec.seed if seq.spec.sampling.sampling else None,
            input_length=len(seq.spec.input_ids),
            tokens=seq.tokens,
            prefill=seq.prefill,
            queued=seq.queued,
            started=seq.started,
        )

    def _prefill_tokens(
        self, seq: _Sequence, ids: list[int], logits: Any
    ) -> list[tuple[int, str, float | None]]:
        import torch

        decode = seq.model.tokenizer.decode
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        out: list[tuple[int, str, float | None]] = [(ids[0], decode([ids[0]]), None)]
        for t in range(1, len(ids)):
            out.append((ids[t], decode([ids[t]]), float(logprobs[t - 1, ids[t]])))
        return out

    def _drop_finished(self) -> None:
        """Release ended or cancelled sequences and pack each model's survivors into its
        slots 0..B-1."""
        for group in self._groups.values():
            active = group.active
            survivors = [s for s in active if not (s.done or s.cancelled)]
            if len(survivors) == len(active):
                continue
            for seq in active:
                if seq.failed:  # before any survivor moves in: masked NaN still poisons attention
                    group.runner.clear(seq.slot)
            for new_slot, seq in enumerate(survivors):
                if seq.slot != new_slot:
                    group.runner.move(seq.slot, new_slot, seq.pos)
                    seq.slot = new_slot
            self._release([s for s in active if s.done or s.cancelled])
            group.active = survivors

    def _release(self, seqs: list[_Sequence]) -> None:
        fresh = [s for s in seqs if not s.released]
        for seq in fresh:
            seq.released = True
        with self._cond:
            self._in_flight -= len(fresh)

    def _fail_all(self, admitted: list[_Sequence], error: Exception) -> None:
        """A bug between sequences: fail this round's admissions and everything decoding."""
        self._fail([*self._active, *admitted], error)

    def _fail(self, seqs: list[_Sequence], error: Exception) -> None:
        """End ``seqs`` with ``error``, clear their slots and take them out of their groups."""
        victims = list({id(s): s for s in seqs}.values())
        for seq in victims:
            if seq.slot >= 0:
                seq.model.runner.clear(seq.slot)
            if not seq.done:
                seq.done = seq.failed = True
                seq.post(None, error)
        self._release(victims)
        gone = {id(s) for s in victims}
        for group in self._groups.values():
            group.active = [s for s in group.active if id(s) not in gone]
