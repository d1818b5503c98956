"""Datasets for every job: the named presets, local files, hub ids, and how rows become text.

    from remote.jobs.dataset import load_splits, load_rows, PRESETS
    train, val = load_splits("alpaca-1k", limit=200)          # Rows, Rows
    pairs = train.examples(eos="<|endoftext|>")               # [(prompt, completion), ...]
    rows = load_rows("data.jsonl", columns="instruction=q,output=a")

A dataset is one of:

- a preset name (``PRESETS``): its hub id, its columns and its kind are known;
- a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (or a directory of them, or a
  ``Dataset.save_to_disk`` folder);
- any Hugging Face hub id (``owner/name``).

Every source is read by one loader, ``open_dataset`` (pretraining's ``--hf-dataset`` uses it
too, with ``.txt`` files allowed), and its columns are mapped onto the fields of one *kind*:
``instruction`` (instruction, optional input, output: Alpaca), ``text`` (plain text, loss on all
of it), ``dialogue`` (an hh-rlhf ``Human:/Assistant:`` transcript, loss on the last reply) or
``preference`` (chosen/rejected pairs, optional prompt, for DPO). A column that is not there
fails here, before any model is loaded, naming the columns that are and the flag that maps them.
No torch import: the control side and the tests may use this freely.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remote.jobs.errors import JobError
from remote.jobs.prompts import PROMPT_FORMAT, format_example, format_prompt

INSTRUCTION, TEXT, DIALOGUE, PREFERENCE = "instruction", "text", "dialogue", "preference"
KINDS = (INSTRUCTION, TEXT, DIALOGUE, PREFERENCE)

# The fields each kind needs, and the ones it can do without (an absent optional column is "").
FIELDS: dict[str, tuple[str, ...]] = {
    INSTRUCTION: ("instruction", "input", "output"),
    TEXT: ("text",),
    DIALOGUE: ("chosen",),
    PREFERENCE: ("prompt", "chosen", "rejected"),
}
OPTIONAL = frozenset({"input", "prompt"})

# Local data files, and the `datasets` builder that reads each. Fine-tuning rows come from
# these; pretraining also reads plain text, one row a line (TEXT_FILE_BUILDERS).
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_FILE_BUILDERS = {**LOCAL_BUILDERS, ".txt": "text"}
VALIDATION_SPLITS = ("validation", "valid", "test")  # used, in this order, when a dataset has one
DEFAULT_VAL_SIZE = 100  # rows held out when the dataset has no validation split of its own
DEFAULT_VAL_FRACTION = 0.05  # ...or this share of the training rows, if that is fewer


class DatasetError(JobError, ValueError):
    """A dataset cannot be found, read or mapped; the message says how to fix it."""


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    kind: str
    columns: Mapping[str, str]  # field -> column in the hub dataset
    data_dir: str | None = None
    about: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "alpaca-1k",
            "dolo650/alpaca_1k",
            INSTRUCTION,
            {"instruction": "instruction", "input": "input", "output": "output"},
            about="1,000 Alpaca instructions: the course's Part 2",
        ),
        Preset(
            "alpaca",
            "tatsu-lab/alpaca",
            INSTRUCTION,
            {"instruction": "instruction", "input": "input", "output": "output"},
            about="52,002 Alpaca instructions",
        ),
        Preset(
            "hh-rlhf",
            "Anthropic/hh-rlhf",
            DIALOGUE,
            {"chosen": "chosen", "rejected": "rejected"},
            data_dir="helpful-base",
            about="Anthropic helpful-base dialogues; SFT on the chosen one, DPO on the pair",
        ),
        Preset(
            "tinystories",
            "roneneldan/TinyStories",
            TEXT,
            {"text": "text"},
            about="short children's stories (plain text)",
        ),
        Preset(
            "netflix",
            "hugginglearners/netflix-shows",
            TEXT,
            {"text": "description"},
            about="Netflix show descriptions (plain text)",
        ),
    )
}


# --- formatting: one row -> (prompt, completion) ------------------------------------------------


def format_instruction(row: Mapping[str, Any], eos: str) -> tuple[str, str]:
    """Alpaca: the prompt from prompts.py, the output closed by EOS (the model learns to stop)."""
    return format_example(_s(row.get("instruction")), _s(row.get("input")), _s(row["output"]), eos)


def format_text(row: Mapping[str, Any], eos: str) -> tuple[str, str]:
    """Plain text: no prompt, so every token carries loss; EOS ends the document."""
    return "", _s(row["text"]).strip() + eos


HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_dialogue(transcript: str) -> list[tuple[str, str]]:
    """An hh-rlhf transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as (role, text) turns."""
    parts = HH_TURN.split(transcript)
    turns = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        turns.append((role, text.strip()))
    return turns


def render_turns(turns: list[tuple[str, str]], eos: str) -> tuple[str, str]:
    """(prompt, last reply + EOS) in the chat format of prompts.PROMPT_FORMAT.

    The prompt is exactly what the chat template renders for the earlier turns plus the generation
    prompt, so a model trained on it answers the same way through ``/v1/chat/completions``.
    """
    if len(turns) < 2 or turns[-1][0] != "assistant":
        raise ValueError("a dialogue needs at least one user turn followed by an assistant reply")
    f = PROMPT_FORMAT
    prompt = f["system"] + f["separator"]
    for role, text in turns[:-1]:
        if role == "user":
            prompt += f["user_prefix"] + text + f["user_suffix"]
        else:
            prompt += text + eos + f["separator"]
    return prompt, turns[-1][1] + eos


def format_dialogue(row: Mapping[str, Any], eos: str) -> tuple[str, str]:
    """hh-rlhf ``chosen``: the conversation so far as the prompt, loss on the final reply."""
    return render_turns(parse_dialogue(_s(row["chosen"])), eos)


def format_preference(row: Mapping[str, Any], eos: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) for DPO; each answer ends with EOS.

    With a ``prompt`` column the answers are plain replies to it; without one both columns are
    hh-rlhf transcripts sharing every turn but the last.
    """
    if _s(row.get("prompt")):
        prompt = format_prompt(_s(row["prompt"]))
        return prompt, _s(row["chosen"]).strip() + eos, _s(row["rejected"]).strip() + eos
    prompt, chosen = render_turns(parse_dialogue(_s(row["chosen"])), eos)
    _, rejected = render_turns(parse_dialogue(_s(row["rejected"])), eos)
    return prompt, chosen, rejected


FORMATTERS = {INSTRUCTION: format_instruction, TEXT: format_text, DIALOGUE: format_dialogue}


def _s(value: Any) -> str:
    return "" if value is None else str(value)


# --- loading -------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Rows of one split, already mapped onto the fields of ``kind``."""

    kind: str
    rows: list[dict[str, str]]
    source: str
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)  # field -> column it came from

    def __len__(self) -> int:
        return len(self.rows)

    def examples(self, eos: str) -> list[tuple[str, str]]:
        """(prompt, completion) pairs for SFT; rows that cannot be formatted are skipped."""
        fmt = FORMATTERS.get(self.kind)
        if fmt is None:
            raise DatasetError(f"{self.kind} rows are for --method dpo, not for SFT")
        out = []
        for row in self.rows:
            try:
                prompt, completion = fmt(row, eos)
            except ValueError:  # e.g. a dialogue with no assistant reply
                continue
            if completion.strip() and completion != eos:
                out.append((prompt, completion))
        return out


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"instruction=prompt,output=answer"`` -> {"instruction": "prompt", "output": "answer"}."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return dict(spec)
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise DatasetError(
                f"bad --columns entry {item!r}: write FIELD=COLUMN pairs separated by commas, "
                "e.g. --columns instruction=prompt,output=answer"
            )
        out[name.strip()] = column.strip()
    known = {f for fields in FIELDS.values() for f in fields}
    unknown = sorted(set(out) - known)
    if unknown:
        raise DatasetError(
            f"--columns names unknown field(s) {', '.join(unknown)}; the fields are "
            f"{', '.join(sorted(known))}"
        )
    return out


def resolve_source(dataset: str) -> tuple[str, Preset | None]:
    """What to hand ``load_dataset``: a preset's hub id, a local path, or a hub id as given."""
    if dataset in PRESETS:
        return PRESETS[dataset].hub_id, PRESETS[dataset]
    path = Path(dataset).expanduser()
    if path.exists():
        return str(path), None
    looks_local = (
        dataset.startswith((".", "/", "~"))
        or path.suffix.lower() in LOCAL_BUILDERS
        or dataset.count("/") != 1
    )
    if looks_local:
        raise DatasetError(
            f"dataset {dataset!r} is not a preset and no such file exists. Give a preset "
            f"({', '.join(PRESETS)}), an existing .jsonl/.csv/.parquet file, or a hub id "
            "such as owner/name"
        )
    return dataset, None


def open_dataset(
    source: str, *, data_dir: str | None = None, builders: Mapping[str, str] = LOCAL_BUILDERS
) -> Any:
    """Every split behind ``source`` as a ``DatasetDict``: a local data file read by the
    builder its suffix names in ``builders``, a ``save_to_disk`` folder, a folder of data
    files, or a hub id. Any failure is a ``DatasetError`` naming the source and what to check.
    """
    import datasets

    path = Path(source)
    try:
        if path.exists():
            datasets.disable_progress_bars()  # a local file loads in a blink: no bars in the log
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(path))
            return saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        if path.is_file():
            builder = builders.get(path.suffix.lower())
            if builder is None:
                kinds = ", ".join(builders)
                raise DatasetError(f"cannot read {source}: use a {kinds} file")
            return datasets.load_dataset(builder, data_files=str(path))
        if path.is_dir():
            return datasets.load_dataset(str(path))
        return datasets.load_dataset(source, data_dir=data_dir)
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many types: say which source, and why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = (
            "check the file's format"
            if path.exists()
            else "check the id and that this machine can reach huggingface.co "
            "(or pre-download it into the HF cache)"
        )
        raise DatasetError(f"could not load dataset {source!r}: {first}. {hint}") from exc


def infer_kind(columns: list[str], mapping: Mapping[str, str]) -> str:
    """Which kind a dataset without a preset is, from the fields mapped or the columns present."""
    named = set(mapping)
    for kind in (PREFERENCE, INSTRUCTION, TEXT, DIALOGUE):
        if named and named <= set(FIELDS[kind]) and named - OPTIONAL:
            if kind == PREFERENCE and "rejected" not in named:
                continue
            return kind
    cols = set(columns)
    if {"instruction", "output"} <= cols:
        return INSTRUCTION
    if "text" in cols:
        return TEXT
    if "chosen" in cols:
        return DIALOGUE
    raise DatasetError(
        f"cannot tell how to use a dataset with columns {', '.join(columns)}. Map them: "
        "--columns instruction=COL,output=COL[,input=COL] for instruction data, or "
        "--text-column COL for plain text"
    )


def map_columns(
    columns: list[str], kind: str, mapping: Mapping[str, str], source: str
) -> dict[str, str]:
    """field -> column for ``kind``; a missing column fails with the ones that exist."""
    out = {}
    for f in FIELDS[kind]:
        column = mapping.get(f, f)
        if column in columns:
            out[f] = column
        elif f in OPTIONAL and f not in mapping:
            continue
        else:
            flag = "--text-column COL" if f == "text" else f"--columns {f}=COL"
            raise DatasetError(
                f"dataset {source!r} has no column {column!r} (needed for the {f!r} field of "
                f"{kind} data). Its columns are: {', '.join(columns)}. Map one with {flag}"
            )
    return out


def _pick_kind(kind: str | None, preset: Preset | None, columns: list[str], mapping) -> str:
    if kind is not None:
        if kind not in KINDS:
            raise DatasetError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        return kind
    if preset is not None and not mapping:
        return preset.kind
    return infer_kind(columns, mapping)


def load_rows(
    dataset: str,
    *,
    split: str = "train",
    limit: int | None = None,
    columns: str | Mapping[str, str] | None = None,
    text_column: str | None = None,
    kind: str | None = None,
) -> Rows:
    """The first ``limit`` rows of ``split``, mapped onto the fields of their kind."""
    train, _ = _load(dataset, split, limit, columns, text_column, kind, val_size=0, seed=0)
    return train


def load_splits(
    dataset: str,
    *,
    limit: int | None = None,
    columns: str | Mapping[str, str] | None = None,
    text_column: str | None = None,
    kind: str | None = None,
    val_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> tuple[Rows, Rows]:
    """(train, validation). The dataset's own validation/test split when it has one; otherwise
    ``val_size`` rows (default: 5% of the rows, at most 100) held out from the training rows.
    ``val_fraction`` sizes it as a share of the rows instead (the course's 90/10: 0.1)."""
    return _load(dataset, "train", limit, columns, text_column, kind, val_size, seed, val_fraction)


def _load(dataset, split, limit, columns, text_column, kind, val_size, seed, val_fraction=None):
    source, preset = resolve_source(dataset)
    mapping = parse_columns(columns)
    if text_column:
        mapping["text"] = text_column
    if preset is not None and not mapping:
        mapping = dict(preset.columns)
    splits = open_dataset(source, data_dir=preset.data_dir if preset else None)
    if split not in splits:
        raise DatasetError(
            f"dataset {dataset!r} has no split {split!r}; it has: {', '.join(splits)}"
        )
    table = splits[split]
    names = list(table.column_names)
    kind = _pick_kind(kind, preset if not (columns or text_column) else None, names, mapping)
    used = map_columns(names, kind, mapping, dataset)
    if limit is not None and limit > 0:
        table = table.select(range(min(limit, len(table))))
    rows = _project(table, used)
    if not rows:
        raise DatasetError(f"dataset {dataset!r} split {split!r} has no rows")
    if val_fraction and val_size is None:
        val_size = max(1, round(len(rows) * val_fraction))
    val_name = next((s for s in VALIDATION_SPLITS if s in splits and s != split), None)
    if val_size == 0:
        val_rows: list[dict[str, str]] = []
    elif val_name is not None:
        n = val_size or DEFAULT_VAL_SIZE
        val_table = splits[val_name]
        val_rows = _project(val_table.select(range(min(n, len(val_table)))), used)
    else:
        rows, val_rows = hold_out(rows, val_size, seed)
        val_name = "held-out"
    train = Rows(kind, rows, dataset, split, used)
    return train, Rows(kind, val_rows, dataset, val_name or "", used)


def _project(table: Any, used: Mapping[str, str]) -> list[dict[str, str]]:
    data = table.select_columns(list(dict.fromkeys(used.values()))).to_dict()
    n = len(next(iter(data.values()))) if data else 0
    return [{f: _s(data[c][i]) for f, c in used.items()} for i in range(n)]


def hold_out(
    rows: list[dict[str, str]], val_size: int | None, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split off a validation set, chosen at random but the same for the same seed."""
    import random

    if len(rows) < 2:
        return rows, []
    if val_size is None:
        val_size = min(DEFAULT_VAL_SIZE, max(1, int(len(rows) * DEFAULT_VAL_FRACTION)))
    n = max(1, min(val_size, len(rows) // 2))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # noqa: S311 (a data split, not a secret)
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def describe_presets() -> str:
    """One line per preset, for ``--help``."""
    return "\n".join(f"  {p.name:<12} {p.hub_id:<30} {p.about}" for p in PRESETS.values())
