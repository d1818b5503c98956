"""Prompt tests, base vs fine-tuned side by side; eval loss, perplexity and reward scores.

    python -m remote.jobs.evaluate --model runs/sft-1/model --base gpt2
    python -m remote.jobs.evaluate --model runs/sft-1/model --base gpt2 \\
        --dataset alpaca-1k --num-prompts 20 --eval-data alpaca-1k --limit 200
    python -m remote.jobs.evaluate --model runs/dpo-1/model --base runs/sft-1/model \\
        --reward-model OpenAssistant/reward-model-deberta-v3-large-v2 --do-sample
    torchrun --nproc_per_node=2 -m remote.jobs.evaluate --model runs/sft-1/model --base gpt2

Writes a run directory (``runs/<name>/``): ``report.md`` (a summary table, then one row per
prompt with every model's answer in its own column; eval_report.py lays it out),
``report.jsonl`` (one row per answer), ``metrics.jsonl`` (one summary row per model),
``run.json`` and ``manifest.sha256``.

Every answer records why it ended (TGI's ``finish_reason``: ``eos_token`` when the model stopped
by itself, ``length`` when it was cut off) and its length in tokens: a fine-tune that learned
to stop shows ``eos_token`` where the base model shows ``length``.

Prompts come from ``--prompts FILE`` (``.txt``: one instruction per line, ``#`` comments;
``.jsonl``: instruction/input rows), from ``--dataset`` (a preset, file or hub id, via
dataset.py; a reference answer column is added when the rows have one), or by default from the
shipped ``remote/jobs/data/eval_prompts.txt``. Each is formatted with prompts.format_prompt,
unless ``--raw-prompts`` (for a pretrained model that never saw the format).

``--eval-data`` scores each model on held-out rows: the loss on the answer tokens only, as
fine-tuning trains, and its perplexity ``exp(loss)``. It takes the same ``--limit``/``--seed``
as ``finetune`` and uses dataset.load_splits, so it scores the very rows that run held out.
Loss is per token of each model's own tokenizer: compare models that share one.

Under torchrun every rank loads the models and answers every N-th prompt and scores every N-th
held-out row; rank 0 gathers them and writes the run. Each prompt's sampling is seeded with
``--seed`` + its index, so answers are the same on any number of ranks, and ``--resume`` skips
the answers an interrupted run already wrote to report.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facts import FinishReason, RunKey, RunState
from remote.jobs import dist as distlib
from remote.jobs import rundir
from remote.jobs.dataset import Rows
from remote.jobs.errors import Interrupted, JobError
from remote.jobs.eval_report import BASE, TUNED, PromptRow, Report, number, render_report
from remote.jobs.flags import opt, parse
from remote.jobs.generation import Answer, RewardModel, Settings
from remote.jobs.guard import Guard
from remote.jobs.models import pick_device
from remote.jobs.prompts import format_prompt
from remote.jobs.signals import StopSignal

log = logging.getLogger("tinycloud.evaluate")

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_PROMPTS = DATA / "eval_prompts.txt"
REPORT_MD, REPORT_JSONL = "report.md", "report.jsonl"
RAW_PREFIX_WORDS = 12  # words of a plain-text row used as its prompt (the rest is the reference)


@dataclass
class Config:
    # what to compare
    model: str | None = opt(None, "the model under test: runs/<run>/model or a hub id")
    base: str | None = opt(None, "a model to compare against side by side, e.g. gpt2")
    # prompts
    prompts: str | None = opt(None, "prompt file: .txt one per line, .jsonl instruction/input")
    dataset: str | None = opt(None, "draw prompts from this preset, file or hub id")
    num_prompts: int = opt(10, "prompts drawn from --dataset")
    columns: str | None = opt(None, "map dataset columns: instruction=COL,input=COL,output=COL")
    raw_prompts: bool = opt(False, "send prompts as written, without the instruction format")
    # held-out loss
    eval_data: str | None = opt(None, "held-out rows for eval loss/perplexity (as finetune)")
    limit: int | None = opt(None, "read only the first N rows of --dataset/--eval-data")
    eval_rows: int = opt(200, "held-out rows scored at most")
    # generation
    max_new_tokens: int = opt(128, "tokens per answer at most")
    do_sample: bool = opt(False, "sample (with the settings below) instead of greedy decoding")
    greedy: bool = opt(False, "greedy decoding: the most likely token each time (the default)")
    temperature: float = opt(0.7, "sampling temperature, > 0")
    top_p: float = opt(0.9, "nucleus sampling mass, 0-1")
    top_k: int = opt(50, "sample among the k likeliest tokens; 0 = all")
    repetition_penalty: float = opt(1.0, "1.0 = none; 1.1-1.3 discourages loops")
    stop: tuple[str, ...] = opt(
        (), "stop strings (TGI's `stop`), e.g. '### Instruction:'", metavar="TEXT"
    )
    # scoring
    reward_model: str | None = opt(None, "score answers with this classifier (id or dir)")
    # common job flags
    name: str | None = opt(None, "run name (default evaluate-YYYYmmdd-HHMMSS)")
    runs_dir: str | None = opt(None, "runs root (default $TINYCLOUD_RUNS, else ./runs)")
    resume: bool = opt(False, "continue run --name, keeping the answers it already has")
    overwrite: bool = opt(False, "start run --name again from scratch")
    seed: int = opt(0, "seeds sampling (per prompt) and the --dataset draw")
    max_steps: int | None = opt(None, "answer at most this many prompts")
    device: str = opt("auto", "where to run", choices=("auto", "cpu", "cuda"))

    def settings(self) -> Settings:
        return Settings(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
        )


def check_config(c: Config, given: set[str] | None = None) -> str | None:
    if not c.model:
        return "--model is required: the model dir to test (e.g. runs/<run>/model)"
    if c.prompts and c.dataset:
        return "give --prompts or --dataset, not both"
    if c.do_sample and c.greedy:
        return "--do-sample and --greedy contradict each other; pick one"
    if c.max_new_tokens < 1 or c.num_prompts < 1 or c.eval_rows < 1:
        return "--max-new-tokens, --num-prompts and --eval-rows must be at least 1"
    if c.do_sample and (c.temperature <= 0 or not 0 < c.top_p <= 1 or c.top_k < 0):
        return "sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0"
    if c.repetition_penalty <= 0:
        return "--repetition-penalty must be positive (1.0 = none)"
    return None


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    instruction: str
    input: str = ""
    reference: str = ""
    text: str | None = None  # already formatted (dialogues, plain text); else format_prompt

    def render(self, raw: bool) -> str:
        if self.text is not None:
            return self.text
        if raw:
            return "\n\n".join(filter(None, (self.instruction, self.input)))
        return format_prompt(self.instruction, self.input)

    def question(self) -> str:
        """What a reward model reads as the human turn."""
        return "\n\n".join(filter(None, (self.instruction, self.input)))

    def row(self, raw: bool) -> PromptRow:
        """As the report shows it: the question, or with --raw-prompts the text as sent."""
        shown = self.text if raw and self.text is not None else self.question()
        return PromptRow(shown, self.reference)


def read_prompt_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise JobError(f"no prompt file at {path}. Give a .txt (one per line) or .jsonl file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() != ".jsonl":
        return [Prompt(s.strip()) for s in lines if s.strip() and not s.lstrip().startswith("#")]
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Prompt(str(row["instruction"]), str(row.get("input") or "")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise JobError(
                f"{path}:{n}: not a JSON object with an 'instruction' ({exc}). "
                'Write one {"instruction": ..., "input": ...} object per line'
            ) from None
    return out


def prompt_from_row(kind: str, row: dict[str, str], eos: str) -> Prompt | None:
    """A dataset row (dataset.py fields) as a prompt plus the answer the data gives."""
    from remote.jobs.dataset import parse_dialogue, render_turns

    if kind == "instruction":
        return Prompt(row["instruction"], row.get("input", ""), row.get("output", ""))
    if kind == "preference" and row.get("prompt"):
        return Prompt(row["prompt"], "", row.get("chosen", ""))
    if kind in ("dialogue", "preference"):
        turns = parse_dialogue(row["chosen"])
        try:
            prompt, reply = render_turns(turns, eos="")
        except ValueError:
            return None
        question = next((t for r, t in reversed(turns) if r == "user"), "")
        return Prompt(question, "", reply, text=prompt)
    words = row.get("text", "").split()
    if len(words) < 2:
        return None
    head = " ".join(words[:RAW_PREFIX_WORDS])
    return Prompt(head, "", " ".join(words[RAW_PREFIX_WORDS:]), text=head)


def draw_prompts(c: Config) -> list[Prompt]:
    if c.dataset is None:
        prompts = read_prompt_file(Path(c.prompts) if c.prompts else DEFAULT_PROMPTS)
    else:
        import random

        from remote.jobs.dataset import load_rows

        rows = load_rows(c.dataset, limit=c.limit, columns=c.columns)
        picked = [prompt_from_row(rows.kind, r, "") for r in rows.rows]
        prompts = [p for p in picked if p is not None]
        random.Random(c.seed).shuffle(prompts)  # noqa: S311 - a reproducible draw, not a secret
        prompts = prompts[: c.num_prompts]
    if c.max_steps:
        prompts = prompts[: c.max_steps]
    if not prompts:
        raise JobError("no prompts to answer: the prompt file or dataset is empty")
    return prompts


# --- numbers -----------------------------------------------------------------------------------


def summarize(answers: list[Answer], loss: tuple[float, int] | None) -> dict[str, Any]:
    """One model's numbers: stop rate, lengths, rewards, eval loss and perplexity."""
    n = len(answers)
    rewards = [a.reward for a in answers if a.reward is not None]
    out: dict[str, Any] = {
        "answers": n,
        "stopped_at_eos": sum(a.finish_reason == FinishReason.EOS for a in answers),
        "mean_new_tokens": round(sum(a.new_tokens for a in answers) / max(n, 1), 2),
        "mean_reward": round(sum(rewards) / len(rewards), 4) if rewards else None,
    }
    if loss is not None and loss[1]:
        mean = loss[0] / loss[1]
        out.update(eval_loss=round(mean, 4), perplexity=round(math.exp(mean), 4))
        out["eval_tokens"] = loss[1]
    return out


# --- the job -----------------------------------------------------------------------------------


def done_answers(run: rundir.RunDir, prompts: list[Prompt]) -> dict[tuple[str, int], Answer]:
    """Answers a previous attempt wrote for these same prompts (for --resume)."""
    out = {}
    for row in rundir.read_metrics(run.path / REPORT_JSONL):
        i = row.get("index", -1)
        if 0 <= i < len(prompts) and row.get("prompt") == prompts[i].question():
            out[(row["model"], i)] = Answer(
                row["answer"], row["finish_reason"], row["new_tokens"], row["seconds"]
            )
    return out


def answer_rows(label: str, path: str, i: int, p: Prompt, a: Answer) -> dict[str, Any]:
    return {
        "index": i,
        "model": label,
        "path": path,
        "prompt": p.question(),
        "input": p.input,
        **a.to_json(),
    }


@dataclass
class Session:
    """What answering every model shares: this rank, the run (rank 0), the stop signal, the
    held-out rows, the answers an interrupted attempt already wrote, and the progress count."""

    d: distlib.Dist
    run: rundir.RunDir | None
    stop: StopSignal
    held_out: Rows | None
    total: int  # answers in all, every model's
    done: dict[tuple[str, int], Answer] = field(default_factory=dict)  # (label, index) -> answer
    answered: int = 0  # by this rank

    def progress(self) -> None:
        self.answered += 1
        if self.run is not None:
            step = self.answered * self.d.world_size
            self.run.update(**{RunKey.STEP: step, RunKey.MAX_STEPS: self.total})


def evaluate_model(
    c: Config, label: str, source: str, prompts: list[Prompt], s: Session
) -> tuple[list[Answer | None], tuple[float, int] | None]:
    """This rank's share of one model's answers, and its summed held-out loss."""
    from remote.jobs.generation import answer, load_lm, token_loss

    d, run, stop, done = s.d, s.run, s.stop, s.done
    model, tok = load_lm(source, pick_device(c.device, d.local_rank))
    mine: list[Answer | None] = [None] * len(prompts)
    for first in range(0, len(prompts), d.world_size):
        # Every rank takes the same number of turns and asks the others each time, so a signal
        # that reached one rank stops them all here (none left waiting in a collective). The
        # answers so far are in report.jsonl: --resume skips them.
        if distlib.any_rank(stop.signum != 0, d):
            raise Interrupted(stop.signum or signal.SIGTERM)
        i = first + d.rank
        if i >= len(prompts):
            continue
        a = done.get((label, i))
        if a is None:
            text = prompts[i].render(c.raw_prompts)
            a = answer(model, tok, text, c.settings(), seed=c.seed + i)
            if run is not None:
                with open(run.path / REPORT_JSONL, "a", encoding="utf-8") as f:
                    f.write(json.dumps(answer_rows(label, source, i, prompts[i], a)) + "\n")
        mine[i] = a
        s.progress()
    loss = None
    if s.held_out is not None:
        share = s.held_out.examples(tok.eos_token)[d.rank :: d.world_size]
        loss = tuple(distlib.all_reduce_sum(list(token_loss(model, tok, share)), d))
    return mine, loss


def merge(shares: list[list[Answer | None]]) -> list[Answer]:
    return [next(s[i] for s in shares if s[i] is not None) for i in range(len(shares[0]))]


def run_eval(c: Config, d: distlib.Dist, run: rundir.RunDir | None, stop: StopSignal) -> dict:
    prompts = draw_prompts(c)
    held_out = None
    if c.eval_data:
        from remote.jobs.dataset import load_splits

        _, held_out = load_splits(c.eval_data, limit=c.limit, columns=c.columns, seed=c.seed)
        held_out.rows = held_out.rows[: c.eval_rows]
    models = {BASE: c.base, TUNED: c.model} if c.base else {TUNED: c.model}
    session = Session(d, run, stop, held_out, total=len(prompts) * len(models))
    if run is not None:
        run.log(
            "evaluate: %d prompts for %s%s", len(prompts), " and ".join(models.values()),
            f"; eval loss on {len(held_out.rows)} held-out rows" if held_out else "",
        )  # fmt: skip
    if run is not None and c.resume:
        session.done = done_answers(run, prompts)
    if run is not None and not c.resume:
        (run.path / REPORT_JSONL).unlink(missing_ok=True)
    answers, losses = {}, {}
    for label, source in models.items():
        mine, losses[label] = evaluate_model(c, label, source, prompts, session)
        answers[label] = merge(distlib.gather_objects(mine, d))
    if not d.is_main or run is None:
        return {}
    if c.reward_model:
        score_answers(c, prompts, answers)
    summary = {lb: summarize(answers[lb], losses[lb]) for lb in models}
    write_outputs(c, run, models, prompts, answers, summary)
    return summary


def score_answers(c: Config, prompts: list[Prompt], answers: dict[str, list[Answer]]) -> None:
    rm = RewardModel(c.reward_model, pick_device(c.device))
    for label, ans in answers.items():
        for p, a in zip(prompts, ans, strict=True):
            a.reward = rm.score(p.question(), a.text)
        log.info("reward model scored %d answers of %s", len(ans), label)


def write_outputs(c, run, models, prompts, answers, summary) -> None:
    lines = [
        json.dumps(answer_rows(label, models[label], i, prompts[i], a))
        for label in models
        for i, a in enumerate(answers[label])
    ]
    rundir.atomic_write_bytes(run.path / REPORT_JSONL, ("\n".join(lines) + "\n").encode())
    for label in models:
        run.append_metrics(
            {"step": len(prompts), "model": label, "path": models[label], **summary[label]}
        )
    report = Report(
        name=run.path.name,
        models=models,
        rows=[p.row(c.raw_prompts) for p in prompts],
        answers=answers,
        summary=summary,
        generation=c.settings().describe(),
        raw=c.raw_prompts,
    )
    text = render_report(report)
    rundir.atomic_write_bytes(run.path / REPORT_MD, text.encode())
    run.finish(RunState.COMPLETED, summary=summary)
    run.write_manifest()


def main(argv: list[str] | None = None) -> int:
    """Exit 0 done, 1 a user error (one ``error:`` line), 143/130 stopped by SIGTERM/SIGINT
    (``--resume`` keeps the answers so far); see guard.py."""
    c, _given = parse(
        Config,
        argv,
        prog="python -m remote.jobs.evaluate",
        description=__doc__,
        check=check_config,
    )
    rundir.setup_logging()
    guard = Guard(distlib.setup())
    return guard.main(lambda: evaluate(c, guard))


def evaluate(c: Config, guard: Guard) -> int:
    d = guard.d
    name = c.name or time.strftime("evaluate-%Y%m%d-%H%M%S")
    opts = {"job": "evaluate", "args": vars(c), "resume": c.resume, "overwrite": c.overwrite}
    with StopSignal() as stop:
        # on rank 0; a run that exists already stops every rank, not only rank 0
        run = guard.track(distlib.on_main(d, rundir.RunDir.create, c.runs_dir, name, **opts))
        summary = run_eval(c, d, run, stop)
    if run is not None:
        print(f"report: {run.path / REPORT_MD}")
        for label, s in summary.items():
            print(f"{label}: " + ", ".join(f"{k} {number(v)}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
