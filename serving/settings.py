"""One settings object for the native server, filled from flags and the environment.

    python -m serving.server --model runs/my-finetune/model --port 8080 \
        --api-key "$KEY" --cors-origin null --quantize int8
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from facts import API_KEY_ENV, API_PORT
from serving import constants as C


@dataclass(frozen=True)
class Settings:
    model: str  # a save_pretrained directory (or a hub id, for users with the network)
    host: str = C.DEFAULT_HOST
    port: int = API_PORT
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    quantize: str | None = None  # None | "int8"
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: one per core
    max_batch_size: int = C.MAX_BATCH_SIZE
    max_queued: int = C.MAX_QUEUED
    max_body_bytes: int = C.MAX_BODY_BYTES
    model_id: str | None = None  # what /info reports; defaults to the directory name
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty. Pass a non-empty --api-key or unset it.")
        if "*" in self.cors_origins and self.api_key:
            raise ValueError(
                "--cors-origin '*' together with an API key would let any web page use the key "
                "a browser holds. Name the chat page's origin instead (or 'null' for a page "
                "opened from disk)."
            )
        if self.max_batch_size < 1 or self.max_queued < 0:
            raise ValueError("--max-batch-size must be >= 1 and --max-queued >= 0.")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"--quantize {self.quantize!r} is not supported; use int8.")
        if self.quantize and self.device != "cpu":
            raise ValueError("--quantize int8 is CPU-only (torch dynamic quantization).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="A small server speaking text-generation-inference's HTTP API.",
    )
    p.add_argument("--model", required=True, help="model directory (save_pretrained output)")
    p.add_argument("--host", default=C.DEFAULT_HOST, help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=API_PORT, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV}; the flag wins)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow this browser origin (repeatable); 'null' allows a page opened from disk",
    )
    p.add_argument("--quantize", choices=["int8"], default=None, help="dynamic int8 (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--max-batch-size", type=int, default=C.MAX_BATCH_SIZE)
    p.add_argument("--max-queued", type=int, default=C.MAX_QUEUED)
    p.add_argument("--max-body-bytes", type=int, default=C.MAX_BODY_BYTES)
    p.add_argument("--model-id", default=None, help="name /info reports (default: dir name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def from_args(argv: list[str] | None = None) -> Settings:
    """Parse flags; the API key falls back to the environment so it need not sit in `ps`."""
    args = build_parser().parse_args(argv)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return Settings(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=api_key,
        cors_origins=tuple(args.cors_origin),
        quantize=args.quantize,
        device=args.device,
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        max_queued=args.max_queued,
        max_body_bytes=args.max_body_bytes,
        model_id=args.model_id,
        log_level=args.log_level,
    )
