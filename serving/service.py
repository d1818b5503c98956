"""What every route needs between the schema and the engine: validate against TGI's rules
(tokenizing in a worker), take places in the engine, wait (watching for a client that leaves),
and keep the books.

The books: every generation request that reaches a route is counted once in
``tgi_request_count`` and settled exactly once — ``tgi_request_success``, or
``tgi_request_failure{err=...}`` with TGI's error type (``internal`` for a bug here), or
``tinycloud_request_cancelled`` when the client left — so the metrics always add up to what
was sent.

Several models: each served id (a model, or a LoRA adapter over one) has its own limits,
tokenizer and grammar compiler (``Served``); a request picks one with ``parameters.adapter_id``
(``model`` on /v1), and an id the server does not serve is a 422. No id: the first, as TGI's
base model.

Routes stay a few lines each: parse with ``schema``, call ``Service``, shape the reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving import constants as C
from serving.engine import Engine, Finished, GenerationFailed, Overloaded, Stream, TokenOut
from serving.grammar import GrammarCompiler
from serving.metrics import Metrics
from serving.model import LoadedModel
from serving.schema import ChatMessage, GenerateParameters, Info, ServedModel
from serving.settings import Settings
from serving.tokenizing import Encoder, Workers, too_long_to_list
from serving.validation import (
    Checked,
    GenerationSpec,
    Limits,
    ValidationError,
    build_spec,
    check_lengths,
    check_parameters,
    max_new_tokens_for,
)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks its client is still there


class TemplateError(ValueError):
    """The chat template could not render these messages (422, error_type template_error)."""


class ToolError(ValueError):
    """A tools request this server cannot run (422, error_type tool_error)."""


class ClientLeft(Exception):
    """The client disconnected before its answer was ready: nobody is left to answer."""


class RequestError(ValueError):
    """A refusal TGI words in its own way (``suffix not supported``, ``batch size exceeded``):
    a 422 with that error type, counted as a validation failure as TGI counts it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """TGI's error type for an exception (what the failure metric and the body say)."""
    if isinstance(exc, RequestError):
        return exc.kind
    if isinstance(exc, ValidationError):
        return C.ERROR_VALIDATION
    if isinstance(exc, Overloaded):
        return C.ERROR_OVERLOADED
    if isinstance(exc, GenerationFailed):
        return C.ERROR_GENERATION
    if isinstance(exc, TemplateError):
        return C.ERROR_TEMPLATE
    if isinstance(exc, ToolError):
        return C.ERROR_TOOL
    return C.ERROR_INTERNAL


@dataclass
class Ticket:
    """One generation request's place in the books, and its clock (for the x-* headers)."""

    metrics: Metrics
    received: float = field(default_factory=time.perf_counter)
    settled: str | None = None

    def settle(self, outcome: str) -> None:
        """Count the request's end once: "success", "cancelled" or an error type."""
        if self.settled is not None:
            return
        self.settled = outcome
        m = self.metrics
        if outcome == "success":
            m.success.inc()
        elif outcome == C.CANCELLED:
            m.cancelled.inc()
        else:
            m.failure.labels(outcome).inc()

    def fail(self, exc: BaseException) -> str:
        kind = error_kind(exc)
        self.settle(C.ERROR_VALIDATION if isinstance(exc, RequestError) else kind)
        return kind


class Served:
    """One id the server answers to: its model (or adapter), and what validating a request
    for it needs — its limits, its tokenizer (off the event loop) and its grammar compiler."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.id = loaded.model_id
        self.limits = Limits(loaded.max_input_tokens, loaded.max_total_tokens)
        self.encoder = Encoder(loaded.tokenizer)
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.eos_token_ids)


@dataclass(frozen=True)
class Prepared:
    """A validated request: one spec per sequence to run (``best_of`` runs several)."""

    specs: list[GenerationSpec]
    constraints: list[Any]
    characters: int  # len(inputs): TGI's x-compute-characters
    served: Served

    @staticmethod
    def together(parts: list[Prepared]) -> Prepared:
        """Several prompts run as one call (/v1/completions with a list)."""
        return Prepared(
            [s for p in parts for s in p.specs],
            [c for p in parts for c in p.constraints],
            sum(p.characters for p in parts),
            parts[0].served,
        )


class Service:
    def __init__(
        self,
        models: LoadedModel | Sequence[LoadedModel],
        engine: Engine,
        settings: Settings,
    ) -> None:
        models = [models] if isinstance(models, LoadedModel) else list(models)
        self.served = {m.model_id: Served(m) for m in models}  # in order: the first is the own
        self.own = self.served[models[0].model_id]
        self.loaded = self.own.loaded
        self.limits = self.own.limits
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(engine)
        self.workers = Workers()
        self.fingerprint = f"{C.VERSION}-native"  # TGI: version + docker label, else "native"

    def close(self) -> None:
        self.workers.close()

    # -- preparing a request -------------------------------------------------------------------

    def ticket(self) -> Ticket:
        self.metrics.requests.inc()
        return Ticket(self.metrics)

    def pick(self, adapter_id: str | None) -> Served:
        """The served id a request names (``adapter_id``, or ``model`` on /v1); none: the
        server's own. TGI 3.3 falls back to its base model for an id it has not loaded; here
        an unknown id is a 422, so a typo never answers from another model."""
        if adapter_id is None:
            return self.own
        served = self.served.get(adapter_id)
        if served is None:
            raise ValidationError(
                f"`adapter_id` {adapter_id!r} is not served here; this server serves "
                f"{', '.join(map(repr, self.served))} (GET /v1/models lists them)"
            )
        return served

    async def prepare(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        add_special_tokens: bool = True,
        stream: bool = False,
        grammar: Any = None,
        served: Served | None = None,
    ) -> Prepared:
        """TGI's validation: the cheap checks here, the rest in a validation worker. The model
        is ``served``, else the one ``params.adapter_id`` names."""
        served = served or self.pick(params.adapter_id)
        checked = check_parameters(inputs, params, served.limits, stream=stream)
        if checked.truncate is None:
            self._refuse_if_hopeless(served, inputs, params)
        args = (served, inputs, params, checked, add_special_tokens, grammar)
        return await self.workers.run(len(inputs), self._validate, *args)

    @staticmethod
    def _refuse_if_hopeless(served: Served, inputs: str, params: GenerateParameters) -> None:
        """An input that cannot fit whatever its tokens are is refused before tokenizing."""
        at_least = served.encoder.at_least(inputs)
        if at_least > served.limits.max_input_tokens:
            max_new = max_new_tokens_for(at_least, params, served.limits)
            check_lengths(at_least, max_new, served.limits, at_least=True)

    def _validate(
        self,
        served: Served,
        inputs: str,
        params: GenerateParameters,
        checked: Checked,
        add_special_tokens: bool,
        grammar: Any,
    ) -> Prepared:
        """In a validation worker: tokenize, count, compile the grammar (TGI's order)."""
        limits = served.limits
        ids = served.encoder.encode(inputs, add_special_tokens, checked.truncate)
        compiled = served.grammars.compile(grammar if grammar is not None else params.grammar)
        specs = [build_spec(ids, params, checked, limits, compiled)]
        specs += [
            build_spec(ids, params, checked, limits, compiled) for _ in range(checked.best_of - 1)
        ]
        eos = served.loaded.eos_token_ids
        constraints = [compiled.constraint(eos) if compiled else None for _ in specs]
        self.metrics.input_length.observe(len(ids))
        self.metrics.max_new_tokens.observe(specs[0].max_new_tokens)
        return Prepared(specs, constraints, len(inputs), served)

    def chat_prompt(self, messages: list[ChatMessage], served: Served | None = None) -> str:
        """Render the conversation with the model's own chat template (as TGI does)."""
        tok = (served or self.own).loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            raise TemplateError(
                "this model has no chat template; use /generate or /v1/completions, or "
                "fine-tune with tinycloud, which writes one into tokenizer_config.json"
            )
        if not messages:
            raise ValidationError("`messages` cannot be empty")
        convo = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2 raises its own types (TemplateError, UndefinedError)
            raise TemplateError(f"the chat template failed on these messages: {e}") from e

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, served: Served | None = None
    ) -> list[dict[str, Any]]:
        """TGI's /tokenize with ``served``'s tokenizer, bounded: see tokenizing.py."""
        served = served or self.own
        cap = C.TOKENIZE_CONTEXTS * served.limits.max_total_tokens
        at_least = served.encoder.at_least(text)
        if at_least > cap:
            raise ValidationError(too_long_to_list(f"at least {at_least}", cap))
        return await self.workers.run(
            len(text), served.encoder.pieces, text, add_special_tokens, cap
        )

    # -- running it ---------------------------------------------------------------------------

    def submit(self, prepared: Prepared) -> list[Stream]:
        return self.engine.submit(prepared.specs, prepared.constraints, prepared.served.loaded)

    async def complete(self, prepared: Prepared, request: Any, ticket: Ticket) -> list[Finished]:
        """Run every sequence to its end; if the client disconnects first, cancel them all and
        free their slots."""
        streams = self.submit(prepared)
        tasks = [asyncio.ensure_future(s.result()) for s in streams]
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=DISCONNECT_POLL_S)
                if not pending or any(t.exception() for t in done):
                    break
                if await request.is_disconnected():
                    ticket.settle(C.CANCELLED)
                    raise ClientLeft
        finally:
            for stream, task in zip(streams, tasks, strict=True):
                stream.cancel()  # a no-op for those that finished
                if not task.done():
                    task.cancel()
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
        if failed:
            raise failed[0]
        ends = [task.result() for task in tasks]
        for end in ends:
            self._record(end, ticket, end.started)
        ticket.settle("success")
        return ends

    async def stream(
        self, stream: Stream, ticket: Ticket, *, settle: bool = True
    ) -> AsyncIterator[tuple[TokenOut, Finished | None]]:
        """Yield tokens as the engine makes them; leaving early (client gone) cancels.
        ``settle``: count the request as answered at the end (the last of several streams)."""
        first = None
        try:
            async for token, end in stream.events():
                first = first or time.perf_counter()
                if end is not None:
                    self._record(end, ticket, first)
                    if settle:
                        ticket.settle("success")
                yield token, end
        except GenerationFailed as e:
            ticket.fail(e)
            raise
        finally:
            stream.cancel()  # a no-op once finished; frees the slot when the client left early

    def _record(self, end: Finished, ticket: Ticket, first: float) -> None:
        m, now = self.metrics, time.perf_counter()
        m.duration.observe(now - ticket.received)
        m.validation_duration.observe(end.queued - ticket.received)
        m.queue_duration.observe(end.started - end.queued)
        m.inference_duration.observe(now - end.started)
        m.time_per_token.observe((now - end.started) / max(end.generated_tokens, 1))
        m.first_token.observe(first - end.started)
        m.generated.observe(end.generated_tokens)
        m.tokens.inc(end.generated_tokens)

    # -- describing the server ------------------------------------------------------------------

    def info(self) -> Info:
        lm = self.loaded
        return Info(
            model_id=lm.model_id,
            max_concurrent_requests=self.engine.capacity,
            max_stop_sequences=self.limits.max_stop_sequences,
            max_input_tokens=lm.max_input_tokens,
            max_total_tokens=lm.max_total_tokens,
            validation_workers=self.workers.count,
            model_dtype=lm.dtype,
            model_device_type=lm.device,
            quantize=lm.quantize,
            prompt_format=lm.prompt_format,
            models=[served_model(s.loaded) for s in self.served.values()],
        )


def served_model(lm: LoadedModel) -> ServedModel:
    """One entry of /info's ``models``: what a served id is and what it costs."""
    return ServedModel(
        id=lm.model_id,
        kind=lm.kind,
        base=lm.base_id,
        max_input_tokens=lm.max_input_tokens,
        max_total_tokens=lm.max_total_tokens,
        memory_bytes=lm.memory_bytes,
        prompt_format=lm.prompt_format,
    )


def timing_headers(
    ticket: Ticket, end: Finished, characters: int, compute_type: str
) -> dict[str, str]:
    """TGI's x-* headers on a finished (non-streamed) answer; times in whole milliseconds."""
    now = time.perf_counter()
    total = now - ticket.received
    inference = now - end.started
    per_token = inference / max(end.generated_tokens, 1)
    ms = lambda seconds: str(int(max(seconds, 0.0) * 1000))  # noqa: E731
    return {
        "x-compute-type": compute_type,
        "x-compute-time": repr(total),
        "x-compute-characters": str(characters),
        "x-total-time": ms(total),
        "x-validation-time": ms(end.queued - ticket.received),
        "x-queue-time": ms(end.started - end.queued),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(end.input_length),
        "x-generated-tokens": str(end.generated_tokens),
    }
