"""The HTTP API's schema: TGI's request and response shapes, and OpenAI's for /v1.

The one place the wire format is written down. Routes in ``server.py`` parse requests with
these models and build responses with them; field names, defaults and which fields may be
``null`` follow text-generation-inference 3.x so any TGI client (the chat page, ``prompt.sh``,
``huggingface_hub.InferenceClient``) works unchanged against the native server.

Models are strict (``"5"`` is not an int) and ignore unknown fields, as TGI's serde does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from facts import FinishReason


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- TGI: /generate, /generate_stream, / ----------------------------------------------------


class GenerateParameters(_Request):
    """TGI's ``parameters`` object. ``None`` means "not given"; validation.py applies TGI's
    rules (temperature > 0, 0 < top_p < 1, at most 4 stop sequences, ...)."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None  # not in TGI's /generate; used by the /v1 routes
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None  # None: as many as the context allows (TGI 3)
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = Field(default=None, ge=0)
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None


class GenerateRequest(_Request):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False  # only read by the compat route ``POST /``


class TokenizeRequest(_Request):
    """TGI's /tokenize body: the generate request's shape; only ``inputs`` matters."""

    inputs: str
    parameters: GenerateParameters | None = None


class Token(_Response):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(_Response):
    id: int
    text: str
    logprob: float | None


class Details(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]


class GenerateResponse(_Response):
    generated_text: str
    details: Details | None = None

    def wire(self) -> dict[str, Any]:
        """TGI omits ``details`` entirely when it was not asked for."""
        return self.model_dump(exclude_none=self.details is None)


class StreamDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(_Response):
    """One SSE ``data:`` event. ``generated_text`` (and ``details`` when asked for) are set on
    the last event only, exactly as TGI does."""

    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(_Response):
    error: str
    error_type: str


class Info(_Response):
    """TGI 3.x ``/info`` plus the fields older clients read (model_dtype, model_device_type)
    and, when the model directory has one, its ``prompt_format``."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_input_length: int  # the pre-3.0 name of max_input_tokens, for old clients
    validation_workers: int = 1
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
    quantize: str | None = None
    prompt_format: dict[str, Any] | None = None


# --- OpenAI-compatible: /v1/completions, /v1/chat/completions, /v1/models ----------------------


class StreamOptions(_Request):
    include_usage: bool = False


class _OpenAIRequest(_Request):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]


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


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


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


class OutputMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: OutputMessage
    logprobs: None = None
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
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionChunk(_OpenAIResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def openai_finish_reason(reason: str) -> str:
    """TGI's /v1 routes say ``stop`` for EOS (``FinishReason::format(true)``) and keep
    ``length`` and ``stop_sequence`` as they are."""
    return "stop" if reason == FinishReason.EOS else str(reason)
