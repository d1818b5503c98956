"""One settings object for the native server, filled from flags and the environment.

    python -m serving.server --model runs/my-finetune/model --port 8080 \
        --api-key "$KEY" --cors-origin null --quantize int8
    python -m serving.server --model base=runs/pre/model --adapter lora=runs/lora/model
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from facts import API_KEY_ENV, API_PORT
from serving import constants as C
from serving.catalog import Spec, parse_spec


@dataclass(frozen=True)
class Settings:
    model: str = ""  # the first --model: a save_pretrained directory (or a hub id)
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
    served: tuple[Spec, ...] = ()  # every --model and --adapter, in order (default: model)
    memory_limit_gb: float | None = None  # refuse a plan over this (default: what is free)
    plan_only: bool = False  # --plan: print what would load and the memory it needs; exit

    def __post_init__(self) -> None:
        if not self.served and self.model:
            object.__setattr__(self, "served", (Spec("model", self.model),))
        if not self.served:
            raise ValueError("name a model to serve: --model DIR (or --model ID=DIR, repeatable).")
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
    p.add_argument(
        "--model",
        action=_Served,
        dest="served",
        metavar="[ID=]DIR",
        help="a model to serve: a save_pretrained directory or hub id, as ID (default: the "
        "run's name); repeatable, the first is the default",
    )
    p.add_argument(
        "--adapter",
        action=_Served,
        dest="served",
        metavar="[ID=]DIR",
        help="a LoRA adapter to serve over its base: a LoRA run's model dir (its adapter/) or "
        "peft's adapter dir; repeatable",
    )
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
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="refuse models that need more than this (default: the memory free now)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the models, their ids and the memory they need, then exit (1: won't fit)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


class _Served(argparse.Action):
    """``--model`` and ``--adapter`` into one list, in the order given (the first is the
    server's own model)."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[override]
        kind = "adapter" if option_string == "--adapter" else "model"
        try:
            spec = parse_spec(kind, value)
        except ValueError as e:
            parser.error(str(e))
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), spec])


def from_args(argv: list[str] | None = None) -> Settings:
    """Parse flags; the API key falls back to the environment so it need not sit in `ps`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.served:
        parser.error("name a model to serve: --model DIR (or --model ID=DIR, repeatable)")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    first_model = next((s.source for s in args.served if s.kind == "model"), "")
    return Settings(
        model=first_model,
        served=tuple(args.served),
        memory_limit_gb=args.memory_limit_gb,
        plan_only=args.plan,
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
