"""``evaluate``'s report.md: a summary table, then every model's answer to each prompt side by side.

    text = render_report(Report(name="ev", models={"base": "gpt2", ...}, rows=[...], ...))

Everything a model wrote is shown as text: each cell is HTML-escaped and its pipes escaped
(``md_cell``), so a model that writes ``<script>`` or ``|`` can neither run code in a Markdown
viewer nor split the table. The numbers come from ``evaluate.summarize``; this module only lays
them out.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from remote.jobs.generation import Answer

BASE, TUNED = "base", "fine-tuned"  # column labels, in table order


@dataclass(frozen=True)
class PromptRow:
    """One prompt as the table shows it, and the answer the data gives (``""``: none)."""

    shown: str
    reference: str = ""


@dataclass(frozen=True)
class Report:
    """What a report is made of: one answer per prompt per model, and each model's numbers."""

    name: str  # the evaluate run's name
    models: Mapping[str, str]  # column label -> the model's path or hub id, in column order
    rows: Sequence[PromptRow]
    answers: Mapping[str, Sequence[Answer]]  # column label -> one answer per row
    summary: Mapping[str, Mapping[str, Any]]  # column label -> evaluate.summarize(...)
    generation: str  # generation.Settings.describe()
    raw: bool  # prompts sent as written (--raw-prompts), not in the instruction format


def md_cell(text: Any) -> str:
    """Text safe inside one Markdown table cell, shown as text: HTML escaped (a model may
    write tags), pipes escaped (they would split the cell), newlines as <br>."""
    s = html.escape(str(text), quote=False).replace("\\", "\\\\").replace("|", "\\|")
    s = s.replace("\r\n", "\n").replace("\r", "\n").strip().replace("\n", "<br>")
    return s or "*(empty)*"


def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def answer_cell(a: Answer) -> str:
    notes = [a.finish_reason, f"{a.new_tokens} tokens"]
    if a.reward is not None:
        notes.append(f"reward {a.reward:.3f}")
    return f"{md_cell(a.text)}<br>*({' · '.join(notes)})*"


def number(value: Any) -> str:
    """A summary value as the table and the console show it: 4 significant digits, – for none."""
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# The summary table's rows: (label, what to show for one model's summary and its path).
STATS: list[tuple[str, Callable[[Mapping[str, Any], str], str]]] = [
    ("model", lambda s, path: md_cell(path)),
    ("stopped at EOS", lambda s, path: f"{s['stopped_at_eos']}/{s['answers']}"),
    ("mean answer length (tokens)", lambda s, path: number(s["mean_new_tokens"])),
    ("eval loss", lambda s, path: number(s.get("eval_loss"))),
    ("perplexity", lambda s, path: number(s.get("perplexity"))),
    ("mean reward", lambda s, path: number(s.get("mean_reward"))),
]


def summary_table(r: Report) -> str:
    labels = list(r.models)
    rows = [[k, *(f(r.summary[lb], r.models[lb]) for lb in labels)] for k, f in STATS]
    return md_table(["", *labels], rows)


def answers_table(r: Report) -> str:
    labels = list(r.models)
    has_ref = any(p.reference for p in r.rows)
    header = ["#", "prompt", *labels] + (["reference"] if has_ref else [])
    rows = []
    for i, p in enumerate(r.rows):
        row = [str(i + 1), md_cell(p.shown), *(answer_cell(r.answers[lb][i]) for lb in labels)]
        rows.append(row + ([md_cell(p.reference)] if has_ref else []))
    return md_table(header, rows, ["--:", *["---"] * (len(header) - 1)])


def render_report(r: Report) -> str:
    sent = "as written (--raw-prompts)" if r.raw else "in the instruction format (prompts.py)"
    return (
        f"# Evaluation `{md_cell(r.name)}`\n\n{summary_table(r)}\n\n"
        f"Generation: {md_cell(r.generation)}. Prompts sent {sent}.\n\n"
        f"## Answers\n\n{answers_table(r)}\n"
    )
