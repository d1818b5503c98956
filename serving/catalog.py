"""What one server serves: the models and LoRA adapters named on its command line, planned
(ids, bases, memory) before anything loads, then loaded.

    python -m serving.server --model runs/sft/model                        # one model, as before
    python -m serving.server --model base=runs/pre/model --model sft=runs/sft/model \\
        --adapter lora=runs/lora/model                                     # three ids

- ``--model [ID=]DIR`` (or a hub id) is a model with its own weights: a full fine-tune, a
  pretrained base. Each has its own KV cache.
- ``--adapter [ID=]DIR`` is a LoRA adapter: a run's ``model/`` (finetune keeps the adapter in
  ``model/adapter/``) or peft's adapter directory itself. It decodes over the model it was
  trained from — ``base_model_name_or_path`` in its ``adapter_config.json``, a relative path
  read from the server's working directory, as the training job read it. When a ``--model``
  is that base (the same directory, or the same hub id) the adapter shares its weights; else the
  base is loaded for the adapters alone and not served under an id of its own. Its tokenizer,
  chat template and prompt format are its run's (they are the same as the base's vocabulary).
- The first id named is the server's own: ``/info`` describes it and a request without
  ``adapter_id`` (or ``model``) goes to it. An id defaults to the run's name (``runs/<run>/model``
  is ``<run>``), else the directory's name or the hub id.

``plan`` reads only config files and file headers (no torch), so ``memory.check`` can refuse a
plan that does not fit before a single weight is read.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facts import ADAPTER_DIR
from serving import memory
from serving.lora import AdapterConfig, AdapterError, find_adapter, read_config

log = logging.getLogger("serving.catalog")

ID_RULE = "letters, digits and . _ - : /, starting with a letter or digit (at most 200)"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")


@dataclass(frozen=True)
class Spec:
    """One ``--model`` or ``--adapter`` flag."""

    kind: str  # "model" | "adapter"
    source: str  # a directory (or, for a model, a hub id)
    id: str | None = None  # None: named after the source


def parse_spec(kind: str, value: str) -> Spec:
    """``ID=SOURCE`` or ``SOURCE``; a source that exists as a path is never split at '='."""
    if "=" in value and not Path(value).exists():
        given, source = value.split("=", 1)
        if not _ID.fullmatch(given):
            raise ValueError(f"--{kind} {value!r}: the id {given!r} must be {ID_RULE}.")
        if not source:
            raise ValueError(f"--{kind} {value!r}: give a directory after '='.")
        return Spec(kind, source, given)
    if not value:
        raise ValueError(f"--{kind} needs a directory, or ID=DIR.")
    return Spec(kind, value)


def looks_local(source: str) -> bool:
    """A path rather than a hub id: it exists, starts like a path, or has more than one '/'."""
    return (
        Path(source).expanduser().exists()
        or source.startswith((".", "/", "~"))
        or (source.count("/") > 1)
    )


def source_key(source: str, cwd: Path | None = None) -> str:
    """What two sources are compared by: the resolved directory, or the hub id."""
    if looks_local(source):
        path = Path(source).expanduser()
        return str((path if path.is_absolute() else (cwd or Path.cwd()) / path).resolve())
    return source


def default_id(source: str) -> str:
    """A run's ``runs/<run>/model`` (or its ``model/adapter``) is known by the run's name."""
    if not looks_local(source):
        return source  # a hub id
    path = Path(source).expanduser().resolve()
    if path.name == ADAPTER_DIR and path.parent.name == "model":
        path = path.parent
    return path.parent.name if path.name == "model" else path.name


@dataclass
class Entry:
    """One thing to load: a model with its own weights, or an adapter over one."""

    id: str
    kind: str  # "model" | "adapter"
    source: str  # model: a directory or hub id; adapter: the directory named on the flag
    listed: bool = True  # False: a base loaded for its adapters only
    shape: memory.Shape | None = None  # model
    adapter: AdapterConfig | None = None  # adapter
    base: str | None = None  # adapter: the id of the model entry it decodes over
    adapters: list[str] = field(default_factory=list)  # model: the adapters over it

    @property
    def files(self) -> str:
        """Where this id's tokenizer and prompt format are read from."""
        if self.kind == "model":
            return self.source
        assert self.adapter is not None
        for where in (Path(self.source), self.adapter.path):
            if any((where / name).is_file() for name in _TOKENIZER_FILES):
                return str(where)
        return ""  # none of its own: its base's


@dataclass
class Plan:
    entries: list[Entry]  # in load order: every model before the adapters over it
    order: list[str]  # the served ids in the order named (the first is the server's own)

    def entry(self, id_: str) -> Entry:
        return next(e for e in self.entries if e.id == id_)

    def needs(self, slots: int, quantize: str | None) -> list[memory.Need]:
        out = []
        for e in self.entries:
            if e.kind == "model":
                assert e.shape is not None
                per_slot = memory.kv_bytes(e.shape, 1)
                what = "model" if e.listed else f"base of {', '.join(e.adapters)}, not served"
                weights = memory.weight_bytes(e.shape, quantize)
                out.append(memory.Need(e.id, what, weights, per_slot * slots, per_slot, e.listed))
            else:
                assert e.adapter is not None
                what = f"LoRA rank {e.adapter.rank} on {'+'.join(e.adapter.targets)} over {e.base}"
                out.append(memory.Need(e.id, what, e.adapter.parameters * 4))
        return out


def plan(specs: list[Spec], *, model_id: str | None = None, cwd: Path | None = None) -> Plan:
    """Ids, bases and sizes for ``specs`` from config files alone. ``model_id``: the id of a
    lone unnamed ``--model`` (the ``--model-id`` flag)."""
    if not specs:
        raise ValueError("name a model to serve: --model DIR (or --model ID=DIR, repeatable).")
    entries: list[Entry] = []
    keys: dict[str, Entry] = {}  # source key -> model entry
    named: dict[Spec, str] = {}
    for spec in specs:
        if spec.kind != "model":
            continue
        id_ = spec.id or (model_id if len(specs) == 1 and model_id else default_id(spec.source))
        entry = Entry(id_, "model", spec.source, shape=read_shape(spec.source))
        entries.append(entry)
        keys.setdefault(source_key(spec.source, cwd), entry)
        named[spec] = id_
    adapters = []
    for spec in specs:
        if spec.kind != "adapter":
            continue
        config = adapter_config(spec.source)
        id_ = spec.id or default_id(spec.source)
        base = keys.get(source_key(config.base, cwd))
        if base is None:  # the base is not served: load it for its adapters only
            source = base_source(config, cwd)
            hidden = default_id(source)
            if hidden in named.values() or any(e.id == hidden for e in entries):
                hidden += " (base)"
            base = Entry(hidden, "model", source, listed=False)
            base.shape = read_shape(base.source)
            entries.append(base)
            keys[source_key(config.base, cwd)] = base
        base.adapters.append(id_)
        adapters.append(Entry(id_, "adapter", spec.source, adapter=config, base=base.id))
        named[spec] = id_
    entries += adapters
    order = [named[s] for s in specs]
    dupes = sorted({i for i in order if order.count(i) > 1})
    if dupes:
        raise ValueError(
            f"two models would both be served as {', '.join(dupes)}: name them, e.g. "
            f"--model {dupes[0]}-a=DIR --model {dupes[0]}-b=DIR."
        )
    for id_ in order:
        if not _ID.fullmatch(id_):
            raise ValueError(f"the model id {id_!r} must be {ID_RULE}: name it, --model ID=DIR.")
    return Plan(entries, order)


def adapter_config(source: str) -> AdapterConfig:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(f"--adapter {source}: no such directory.")
    found = find_adapter(path)
    if found is None:
        raise ValueError(
            f"--adapter {source}: no LoRA adapter there (no adapter_config.json, nor "
            f"{ADAPTER_DIR}/adapter_config.json). A full fine-tune is served with --model; a LoRA "
            "run trained before adapters were kept has only its merged model: --model too."
        )
    try:
        return read_config(found)
    except AdapterError as e:
        raise ValueError(str(e)) from e


def base_source(config: AdapterConfig, cwd: Path | None) -> str:
    """The adapter's base as a loadable source: a directory resolved from ``cwd``, or a hub id."""
    if not looks_local(config.base):
        return config.base
    key = Path(source_key(config.base, cwd))
    if not key.is_dir():
        raise ValueError(
            f"the adapter in {config.path} was trained on {config.base} (adapter_config.json's "
            f"base_model_name_or_path), which is not a directory here ({key}). Start the server "
            "where the training ran (relative paths are read from there), or serve the merged "
            "model instead: --model ID=<the run's model dir>."
        )
    return str(key)


def read_shape(source: str) -> memory.Shape:
    """A model's sizes from its config.json (a hub id: from transformers' cache or the Hub)."""
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{source} is not a model directory (config.json: {e}).") from e
    elif looks_local(source):
        raise ValueError(f"could not load the model from {source}: no such directory.")
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source).to_dict()
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load the model from {source}: {e}") from e
    if config.get("model_type") not in (None, "gpt2"):
        raise ValueError(
            f"the native server runs GPT-2 models; {source} is {config.get('model_type')!r}. "
            "Serve it with TGI (launch_gpt2.sh) instead."
        )
    return memory.shape_of(config)


# --- loading -------------------------------------------------------------------------------


def load(p: Plan, *, quantize: str | None, device: str, slots: int) -> list[Any]:
    """Load every entry of the plan; the served ``LoadedModel``s, the server's own first."""
    from serving.model import load_model

    needs = {n.id: n for n in p.needs(slots, quantize)}
    loaded: dict[str, Any] = {}
    for e in p.entries:
        before = _rss()
        if e.kind == "model":
            lm = load_model(e.source, quantize=quantize, device=device, slots=slots, model_id=e.id)
        else:
            lm = load_adapter(e, loaded[e.base])
            lm.memory_bytes = needs[e.id].total
        loaded[e.id] = lm
        grew = f", the process grew {memory.mib(_rss() - before)}" if before else ""
        log.info("loaded %s: %s%s", e.id, describe_need(needs[e.id], slots), grew)
    return [loaded[i] for i in p.order]


def describe_need(need: memory.Need, slots: int) -> str:
    size = memory.mib(need.weights)
    if need.kv:
        size += f" weights + {memory.mib(need.kv)} KV cache ({slots} slots)"
    return f"{size} ({need.what})"


def load_adapter(e: Entry, base: Any) -> Any:
    """An adapter as a ``LoadedModel`` sharing ``base``'s runner: its own tokenizer, chat
    template and prompt format where its run has them."""
    from dataclasses import replace

    from serving.lora import read_deltas
    from serving.model import eos_ids_of, read_prompt_format

    assert e.adapter is not None
    index = base.runner.add_adapter(read_deltas(e.adapter))
    files = e.files
    tokenizer, fmt, eos = base.tokenizer, base.prompt_format, base.eos_token_ids
    if files:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(files)
        if len(tokenizer) > base.runner.vocab_size:
            raise ValueError(
                f"the adapter {e.id}'s tokenizer has {len(tokenizer)} tokens and its base "
                f"{base.model_id} {base.runner.vocab_size}: they do not belong together."
            )
        fmt = read_prompt_format(Path(files))
        eos = eos_ids_of(Path(files), tokenizer) or eos
    return replace(
        base,
        tokenizer=tokenizer,
        model_id=e.id,
        prompt_format=fmt,
        eos_token_ids=eos,
        adapter=index,
        base_id=base.model_id,
        kind="adapter",
    )


def _rss() -> int:
    """This process's resident size in bytes (0 where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
