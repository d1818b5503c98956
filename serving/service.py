"""What every route needs between the schema and the engine: tokenize, validate against TGI's
rules, take a place in the engine, wait (watching for a client that leaves), count metrics.

Routes stay a few lines each: parse with ``schema``, call ``Service``, shape the reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from serving import constants as C
from serving.engine import Engine, Finished, Overloaded, Stream, TokenOut
from serving.metrics import Metrics
from serving.model import LoadedModel
from serving.schema import ChatMessage, GenerateParameters, Info
from serving.settings import Settings
from serving.validation import GenerationSpec, Limits, ValidationError, build_spec

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks its client is still there


class TemplateError(ValueError):
    """The chat template could not render these messages (422, error_type template_error)."""


class Service:
    def __init__(self, loaded: LoadedModel, engine: Engine, settings: Settings) -> None:
        self.loaded = loaded
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(engine)
        self.limits = Limits(loaded.max_input_tokens, loaded.max_total_tokens)
        self.fingerprint = f"{C.VERSION}-{loaded.dtype.removeprefix('torch.')}"

    # -- preparing a request -------------------------------------------------------------------

    def prepare(
        self, inputs: str, params: GenerateParameters, *, add_special_tokens: bool = True
    ) -> GenerationSpec:
        self.metrics.requests.inc()
        try:
            ids = self.loaded.tokenizer(inputs, add_special_tokens=add_special_tokens)["input_ids"]
            return build_spec(inputs, ids, params, self.limits)
        except ValidationError:
            self.metrics.failure.labels(C.ERROR_VALIDATION).inc()
            raise

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        """Render the conversation with the model's own chat template (as TGI does)."""
        tok = self.loaded.tokenizer
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

    # -- running it ---------------------------------------------------------------------------

    def submit(self, spec: GenerationSpec) -> Stream:
        try:
            return self.engine.submit(spec)
        except Overloaded:
            self.metrics.failure.labels(C.ERROR_OVERLOADED).inc()
            raise

    async def complete(self, spec: GenerationSpec, request: Any) -> Finished:
        """Run to the end; if the client disconnects first, cancel and free the slot."""
        stream = self.submit(spec)
        started = time.perf_counter()
        task = asyncio.ensure_future(stream.result())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    stream.cancel()
                    task.cancel()
                    raise asyncio.CancelledError("client disconnected")
        except BaseException:
            stream.cancel()
            task.cancel()
            raise
        end = task.result()
        self._record(end, started, started)
        return end

    async def stream(self, stream: Stream) -> AsyncIterator[tuple[TokenOut, Finished | None]]:
        """Yield tokens as the engine makes them; leaving early (client gone) cancels."""
        started = time.perf_counter()
        first = None
        try:
            async for token, end in stream.events():
                first = first or time.perf_counter()
                if end is not None:
                    self._record(end, started, first)
                yield token, end
        finally:
            stream.cancel()  # a no-op once finished; frees the slot when the client left early

    def _record(self, end: Finished, started: float, first: float) -> None:
        m = self.metrics
        m.success.inc()
        m.duration.observe(time.perf_counter() - started)
        m.first_token.observe(first - started)
        m.generated.observe(end.generated_tokens)
        m.tokens.inc(end.generated_tokens)

    # -- describing the server ------------------------------------------------------------------

    def info(self) -> Info:
        lm, s = self.loaded, self.settings
        return Info(
            model_id=lm.model_id,
            model_dtype=lm.dtype,
            model_device_type=lm.device,
            max_concurrent_requests=self.engine.capacity,
            max_stop_sequences=self.limits.max_stop_sequences,
            max_input_tokens=lm.max_input_tokens,
            max_total_tokens=lm.max_total_tokens,
            max_input_length=lm.max_input_tokens,
            max_client_batch_size=s.max_batch_size,
            router=C.ROUTER_NAME,
            version=C.VERSION,
            quantize=lm.quantize,
            prompt_format=lm.prompt_format,
        )
