"""Every number and name the serving side alone uses: limits, error types, the TGI image.

The native server, the launch/prompt script templates and the tests all read these; nothing
else spells them out. What other layers need too (the API port, the API key's variable, the
finish reasons, the prompt format's file name) is in the top-level ``facts.py``.
"""

from __future__ import annotations

# --- network (the API port and the key's variable are in facts.py: every layer uses them) ---------
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise; the VM passes --host 0.0.0.0
TGI_CONTAINER_PORT = 80  # what TGI listens on inside its container

# --- the TGI image --------------------------------------------------------------------------------
DEFAULT_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.1.0"
DEFAULT_CONTAINER_NAME = "tinycloud-tgi"
TGI_HEALTH_TIMEOUT_S = 600  # launch_gpt2.sh waits this long for /health (first load is slow)

# --- request limits (TGI 3.3's launcher defaults where TGI has one) -------------------------------
MAX_STOP_SEQUENCES = 4  # TGI --max-stop-sequences
MAX_BEST_OF = 2  # TGI --max-best-of: /generate may sample this many and keep the likeliest
MAX_TOP_N_TOKENS = 5  # TGI --max-top-n-tokens: alternatives reported per generated token
MAX_CLIENT_BATCH_SIZE = 4  # TGI --max-client-batch-size: prompts in one /v1/completions call
MAX_BODY_BYTES = 2_000_000  # TGI --payload-limit: bigger bodies get 413, chunked or not
DEFAULT_MAX_NEW_TOKENS_CAP = 1024  # when a request names no max_new_tokens (TGI's rule)
MAX_BATCH_SIZE = 8  # sequences decoded together; each holds a KV cache slot
MAX_QUEUED = 64  # requests waiting for a slot; one more gets 429
RETRY_AFTER_S = 1  # the Retry-After a 429 carries
U32_MAX = 2**32 - 1  # TGI's u32 fields (max_new_tokens, top_n_tokens, ...): larger is a 422
U64_MAX = 2**64 - 1  # TGI's u64 fields (seed)

# --- validation workers: parsing, tokenizing and grammar compiling, off the event loop ------------
VALIDATION_WORKERS = 2  # TGI --validation-workers: threads for ordinary requests
LARGE_INPUT_CHARS = 64 * 1024  # inputs this long wait in a lane of their own (one thread), so
LARGE_INPUT_WAITING = 4  # a few huge ones never delay ordinary requests; one more waiting: 429
TOKENIZE_CONTEXTS = 16  # /tokenize lists at most this many contexts' worth of tokens

# --- sampling constants TGI fixes -----------------------------------------------------------------
WATERMARK_GAMMA = 0.5  # TGI's WATERMARK_GAMMA default: share of the vocabulary in the green list
WATERMARK_DELTA = 2.0  # TGI's WATERMARK_DELTA default: logit bonus of a green token
WATERMARK_HASH_KEY = 15485863  # TGI's prime that seeds the green list from the previous token
JSON_WHITESPACE = r"[ ]?"  # outlines-core's (so TGI's) whitespace between JSON tokens

# --- error bodies: {"error": ..., "error_type": ...}, TGI's types and words -----------------------
ERROR_VALIDATION = "validation"  # 422 (400 for a body that is not JSON, 413 for a huge one)
ERROR_OVERLOADED = "overloaded"  # 429
ERROR_AUTH = "authentication"  # 401
ERROR_GENERATION = "generation"  # 424: the model failed on this request (TGI's status)
ERROR_TEMPLATE = "template_error"  # 422: the chat template could not render the messages
ERROR_TOOL = "tool_error"  # 422: tools with response_format (TGI's ToolError)
ERROR_SUFFIX = "suffix not supported"  # 422: /v1/completions with `suffix` (TGI's words)
ERROR_BATCH_SIZE = "batch size exceeded"  # 422: too many prompts in one /v1/completions call
ERROR_INTERNAL = "internal"  # 500: a bug in this server (no TGI equivalent); it is logged
ERROR_NOT_FOUND = "not_found"  # 404
ERROR_HTTP = "http"  # any other HTTP error (405, ...)
CANCELLED = "cancelled"  # not an error: the client left; counted so the metrics add up
VALIDATION_PREFIX = "Input validation error: "  # TGI's InferError::ValidationError
GENERATION_PREFIX = "Request failed during generation: "  # TGI's InferError::GenerationError
TEMPLATE_PREFIX = "Template error: "  # TGI's InferError::TemplateError
STATUS = {  # the status each error type answers with, as TGI maps its InferError
    ERROR_VALIDATION: 422,
    ERROR_OVERLOADED: 429,
    ERROR_GENERATION: 424,
    ERROR_TEMPLATE: 422,
    ERROR_TOOL: 422,
    ERROR_SUFFIX: 422,
    ERROR_BATCH_SIZE: 422,
    ERROR_INTERNAL: 500,
}

# --- what /info and the x-* headers report --------------------------------------------------------
VERSION = "3.3.7-tinycloud"  # the TGI API spoken (3.3.7, TGI's last release), tagged as ours
ROUTER_NAME = "tinycloud-native"
PIPELINE_TAG = "text-generation"
