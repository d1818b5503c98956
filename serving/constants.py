"""Every number and name the serving side agrees on: ports, limits, error types, the TGI image.

The native server, the launch/prompt script templates and the tests all read these; nothing
else spells them out.
"""

from __future__ import annotations

# --- network ---------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise; the VM passes --host 0.0.0.0
DEFAULT_PORT = 8080  # the API port, native server and TGI alike
TGI_CONTAINER_PORT = 80  # what TGI listens on inside its container
API_KEY_ENV = "TINYCLOUD_API_KEY"  # env var the native server reads its API key from

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

# --- finish reasons (TGI's names) --------------------------------------------------------------
FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"

# --- what /info reports ----------------------------------------------------------------------
VERSION = "3.1.0-tinycloud"  # the TGI API version spoken, tagged as ours
ROUTER_NAME = "tinycloud-native"

# Written by remote/jobs/prompts.py (PROMPT_FORMAT_FILE) beside the model; serving may not import
# remote.jobs, so the name is repeated here and a test checks the two agree.
PROMPT_FORMAT_FILE = "prompt_format.json"
