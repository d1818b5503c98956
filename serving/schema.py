"""The HTTP API's schema: TGI 3.3's request and response shapes, and OpenAI's for /v1.

The one place the wire format is written down. Routes in ``server.py`` and ``openai_routes.py``
parse requests with these models and build responses with them; field names, defaults, which
fields may be ``null`` and which are left out follow text-generation-inference 3.3
(router/src/lib.rs) so any TGI client (the chat page, ``prompt.sh``,
``huggingface_hub.InferenceClient``) works unchanged against the native server. The server's
OpenAPI document (``/openapi.json``) is generated from these models, and the fuzz tests drive
the server from it.

Models are strict (``"5"`` is not an int) and ignore unknown fields, as TGI's serde does. Numbers
are read as TGI's Rust types read them: reals as ``f32`` (``1e-300`` becomes 0.0, so a
temperature of ``1e-300`` is refused as not positive, exactly as TGI refuses it; what ``f32``
cannot hold, and NaN or infinity, is refused), counts as ``u32``/``u64`` (a ``seed`` of 2**64
is a 422, not an overflow in the sampler).
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from facts import FinishReason
from serving import constants as C


def _as_f32(value: float) -> float:
    """What TGI's ``f32`` fields hold for ``value``: rounded, never NaN or infinite."""
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    try:
        f32 = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        f32 = math.inf
    if not math.isfinite(f32):
        raise ValueError("is too large for a 32-bit float (|x| < 3.4e38)")
    return f32


F32 = Annotated[float, AfterValidator(_as_f32)]
U32 = Annotated[int, Field(ge=0, le=C.U32_MAX)]
U64 = Annotated[int, Field(ge=0, le=C.U64_MAX)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- grammars: TGI's GrammarType (tag "type", content "value") ------------------------------------


class JsonGrammar(_Request):
    """A JSON Schema (an object, or a string holding one); it must have ``properties``."""

    type: Literal["json", "json_object"]
    value: Any


class RegexGrammar(_Request):
    type: Literal["regex"]
    value: str


class JsonSchemaConfig(_Request):
    name: str | None = None
    schema_: Any = Field(alias="schema")


class JsonSchemaGrammar(_Request):
    type: Literal["json_schema"]
    value: JsonSchemaConfig


Grammar = Annotated[JsonGrammar | RegexGrammar | JsonSchemaGrammar, Field(discriminator="type")]


# --- TGI: /generate, /generate_stream, /, /tokenize -----------------------------------------------


class GenerateParameters(_Request):
    """TGI's ``parameters`` object. ``None`` means "not given"; validation.py applies TGI's
    rules (temperature > 0, 0 < top_p < 1, at most 4 stop sequences, ...)."""

    best_of: U64 | None = None
    temperature: F32 | None = None
    repetition_penalty: F32 | None = None
    frequency_penalty: F32 | None = None
    presence_penalty: F32 | None = None  # not in TGI's /generate; the /v1 routes pass it
    top_k: I32 | None = None
    top_p: F32 | None = None
    typical_p: F32 | None = None
    do_sample: bool = False
    max_new_tokens: U32 | None = None  # None: as many as the context allows (TGI 3)
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: U64 | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: U64 | None = None
    top_n_tokens: U32 | None = None
    grammar: Grammar | None = None
    adapter_id: str | None = None


def _default_parameters() -> GenerateParameters:
    """TGI's ``default_parameters()``: a request that sends no ``parameters`` at all samples
    (``do_sample: true``), while ``"parameters": {}`` is greedy — TGI's rule, kept."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Request):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False  # ``POST /``: picks /generate_stream or /generate


class Token(_Response):
    id: int
    text: str
    logprob: float | None  # null where the log-probability is not a finite number, as TGI
    special: bool


class PrefillToken(_Response):
    id: int
    text: str
    logprob: float | None  # the first prompt token has none


class SimpleToken(_Response):
    """One token of /tokenize: ``start``/``stop`` are byte offsets into the UTF-8 input."""

    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(_Response):
    tokenize_response: list[SimpleToken]
    templated_text: str


class BestOfSequence(_Response):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None
    top_tokens: list[list[Token]] = Field(default_factory=list)


def _drop_empty(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """TGI leaves out ``top_tokens`` when empty and ``best_of_sequences`` when absent."""
    for key in keys:
        if data.get(key) in (None, []):
            data.pop(key, None)
    return data


class GenerateResponse(_Response):
    generated_text: str
    details: Details | None = None

    def wire(self) -> dict[str, Any]:
        """TGI omits ``details`` entirely when it was not asked for, and empty extras in it."""
        data = self.model_dump()
        if data["details"] is None:
            data.pop("details")
            return data
        _drop_empty(data["details"], "top_tokens", "best_of_sequences")
        for seq in data["details"].get("best_of_sequences") or []:
            _drop_empty(seq, "top_tokens")
        return data


class StreamDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(_Response):
    """One SSE ``data:`` event. ``generated_text`` (and ``details`` when asked for) are set on
    the last event only, and ``top_tokens`` only when ``top_n_tokens`` was asked for, as TGI."""

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None

    def wire(self) -> dict[str, Any]:
        return _drop_empty(self.model_dump(), "top_tokens")


class ErrorResponse(_Response):
    error: str
    error_type: str


class ServedModel(_Response):
    """One model (or LoRA adapter) the server serves, as ``/info``'s ``models`` lists it."""

    id: str  # what ``parameters.adapter_id`` (``model`` on /v1) names
    kind: Literal["model", "adapter"]  # its own weights, or a LoRA adapter over ``base``
    base: str | None = None
    max_input_tokens: int
    max_total_tokens: int
    memory_bytes: int  # planned: weights + KV cache for a model, A and B for an adapter
    prompt_format: dict[str, Any] | None = None


class Info(_Response):
    """TGI 3.3's ``/info``, field for field, plus what this server adds: the weights' dtype
    and device (TGI 2 reported them), the quantization, the model's ``prompt_format``, and every
    served model (``models``; the first is the one described above)."""

    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str | None = C.PIPELINE_TAG
    max_concurrent_requests: int
    max_best_of: int = C.MAX_BEST_OF
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int = C.VALIDATION_WORKERS
    max_client_batch_size: int = C.MAX_CLIENT_BATCH_SIZE
    router: str = C.ROUTER_NAME
    version: str = C.VERSION
    sha: str | None = None
    docker_label: str | None = None
    model_dtype: str
    model_device_type: str
    quantize: str | None = None
    prompt_format: dict[str, Any] | None = None
    models: list[ServedModel] = Field(default_factory=list)


# --- OpenAI-compatible: /v1/completions, /v1/chat/completions, /v1/models, /chat_tokenize ---------


class StreamOptions(_Request):
    include_usage: bool = False


class _OpenAIRequest(_Request):
    model: str | None = None  # a served id; "tgi" or absent: the server's own (TGI's rule)
    max_tokens: U32 | None = None
    temperature: F32 | None = None
    top_p: F32 | None = None
    frequency_penalty: F32 | None = None
    repetition_penalty: F32 | None = None
    seed: U64 | None = None
    stop: str | list[str] | None = None  # TGI takes a list; a lone string is OpenAI's
    stream: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    suffix: str | None = None  # TGI refuses it (422, "suffix not supported")
    presence_penalty: F32 | None = None  # OpenAI's; TGI's completions ignore it


class TextChunk(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextChunk] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(chunk.text for chunk in self.content)


class TextFormat(_Request):
    """OpenAI's ``{"type": "text"}``: no constraint (TGI does not know it; accepted here)."""

    type: Literal["text"]


class JsonFormat(_Request):
    """TGI's ``json``/``json_object`` grammar; without ``value`` (OpenAI's JSON mode), any JSON
    object."""

    type: Literal["json", "json_object"]
    value: Any = None


class JsonSchemaFormat(_Request):
    """TGI's ``{"type": "json_schema", "value": {...}}``, or OpenAI's ``json_schema`` key."""

    type: Literal["json_schema"]
    value: JsonSchemaConfig | None = None
    json_schema: JsonSchemaConfig | None = None


ResponseFormat = Annotated[
    TextFormat | JsonFormat | RegexGrammar | JsonSchemaFormat, Field(discriminator="type")
]


class ChatRequest(_Request):
    model: str | None = None  # a served id; "tgi" or absent: the server's own (TGI's rule)
    messages: list[ChatMessage]
    frequency_penalty: F32 | None = None
    logit_bias: Any = None  # unused, as in TGI
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    max_tokens: U32 | None = None
    max_completion_tokens: U32 | None = None  # OpenAI's newer name; TGI reads it as max_tokens
    n: U32 | None = None  # unused, as in TGI: one choice is returned
    presence_penalty: F32 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    seed: U64 | None = None
    temperature: F32 | None = None
    top_p: F32 | None = None
    tools: list[Any] | None = None  # refused: see docs/serving.md
    tool_choice: Any = None
    tool_prompt: str | None = None
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class _OpenAIResponse(_Response):
    """The envelope every OpenAI-shaped answer shares; subclasses fix ``object``."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


class Completion(_OpenAIResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None

    def wire(self) -> dict[str, Any]:
        """TGI's streamed chunks carry no ``usage`` key; its final answers always do."""
        return _drop_empty(self.model_dump(), "usage")


class TopLogprob(_Response):
    token: str
    logprob: float | None


class ContentLogprob(_Response):
    token: str
    logprob: float | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ContentLogprob]


class OutputMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: OutputMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(_OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionChunk(_OpenAIResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    prompt_format: dict[str, Any] | None = None  # this server's: the chat page reads it


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(_Response):
    message: str
    http_status_code: int


class OpenAIErrorEvent(_Response):
    """How TGI reports a failure inside an OpenAI stream (status 422 whatever the cause)."""

    error: OpenAIErrorDetail


def openai_finish_reason(reason: str) -> str:
    """TGI's /v1 answers say ``stop`` for EOS (``FinishReason::format(true)``) and keep
    ``length`` and ``stop_sequence`` as they are."""
    return "stop" if reason == FinishReason.EOS else str(reason)
