"""Every number and name the serving side alone uses: limits, error types, the TGI image.

The native server, the launch/prompt script templates and the tests all read these; nothing
else spells them out. What other layers need too (the API port, the API key's variable, the
finish reasons, the prompt format's file name) is in the top-level ``facts.py``.
"""

from __future__ import annotations

# --- network (the API port and the key's variable are in facts.py: every layer uses them) ---
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise; the VM passes --host 0.0.0.0
TGI_CONTAINER_PORT = 80  # what TGI listens on inside its container

# --- the TGI image -----------------------------------------------------------------------------
DEFAULT_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.1.0"
DEFAULT_CONTAINER_NAME = "tinycloud-tgi"
TGI_HEALTH_TIMEOUT_S = 600  # launch_gpt2.sh waits this long for /health (first load is slow)

# --- request limits (TGI's defaults where TGI has one) -------------------------------------------
MAX_STOP_SEQUENCES = 4  # TGI --max-stop-sequences
MAX_BODY_BYTES = 2 * 1024 * 1024  # 2 MiB, as TGI's body limit; bigger bodies get 413
DEFAULT_MAX_NEW_TOKENS_CAP = 1024  # when a request names no max_new_tokens (TGI's rule)
MAX_BATCH_SIZE = 8  # sequences decoded together; each holds a KV cache slot
MAX_QUEUED = 64  # requests waiting for a slot; one more gets 429
RETRY_AFTER_S = 1  # the Retry-After a 429 carries

# --- error bodies: {"error": ..., "error_type": ...} -------------------------------------------
ERROR_VALIDATION = "validation"  # 422 (and 413 for an oversized body)
ERROR_OVERLOADED = "overloaded"  # 429
ERROR_AUTH = "authentication"  # 401
ERROR_GENERATION = "generation"  # 500: the model itself failed
ERROR_NOT_FOUND = "not_found"  # 404
ERROR_TEMPLATE = "template_error"  # 422: the chat template could not render the messages
ERROR_HTTP = "http"  # any other HTTP error (405, ...)

# --- what /info reports ----------------------------------------------------------------------
VERSION = "3.1.0-tinycloud"  # the TGI API version spoken, tagged as ours
ROUTER_NAME = "tinycloud-native"
