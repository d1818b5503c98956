"""`fab demo`: the whole journey on this machine, offline, in a few minutes.

    uv run --locked --all-groups fab demo            # pretrain, fine-tune, evaluate, serve, chat
    uv run --locked --all-groups fab demo --fresh    # start again from nothing

Runs the same jobs `fab train` runs on a VM, through the same launcher, on the local target
(``.tinycloud/local/work``): pretrain a small GPT-2 on the shipped corpus, fine-tune it on the
shipped instruction set, compare the two on the shipped prompts, serve the result with the
native engine on 127.0.0.1, render the chat page, and ask it one question. A step whose run
already completed is reused, and one that was interrupted is resumed, so running it again is
cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from invoke import Exit

from remote import paths
from remote.launch import find_run, follow, start_job
from remote.runner import Runner

DATA = paths.ROOT / "remote" / "jobs" / "data"
QUESTION = "What does a language model predict?"


@dataclass(frozen=True)
class Step:
    job: str
    name: str
    title: str
    flags: tuple[str, ...]


def steps(scale: float = 1.0) -> list[Step]:
    """The demo's three jobs. ``scale`` shrinks the step counts (the tests run it at ~0.05)."""

    def n(steps: int) -> str:
        return str(max(2, round(steps * scale)))

    pretrain = "runs/demo-pretrain/model"
    tuned = "runs/demo-finetune/model"
    return [
        Step(
            "pretrain",
            "demo-pretrain",
            "pretrain a 4-layer GPT-2 on the shipped corpus",
            (
                *("--tokenizer", "bpe", "--vocab-size", "2048", "--block-size", "256"),
                *("--batch-size", "8", "--max-steps", n(300), "--warmup-steps", n(30)),
                *("--eval-interval", n(100), "--log-interval", n(25)),
            ),
        ),
        Step(
            "finetune",
            "demo-finetune",
            "fine-tune it on the shipped instructions",
            (
                *("--model", pretrain, "--dataset", str(DATA / "instructions.jsonl")),
                *("--max-steps", n(300), "--batch-size", "8", "--lr", "1e-3"),
                *("--warmup-steps", n(20), "--logging-steps", n(25), "--eval-steps", n(100)),
                # serve the best model by validation loss: on 272 instructions it overfits
                # before step 300, and the last step's weights are not the best
                *("--save-steps", n(100), "--keep", "best"),
            ),
        ),
        Step(
            "evaluate",
            "demo-evaluate",
            "compare pretrained and fine-tuned on the shipped prompts",
            (
                *("--model", tuned, "--base", pretrain),
                *("--prompts", str(DATA / "eval_prompts.txt"), "--max-new-tokens", "48"),
            ),
        ),
    ]


def check_local_environment() -> None:
    """The demo trains here, so this environment needs the train and serve groups."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "uvicorn") if not importlib.util.find_spec(m)]
    if missing:
        raise Exit(
            f"the demo trains and serves on this machine, and {', '.join(missing)} is not "
            "installed here. Run it as `uv run --locked --all-groups fab demo`."
        )


def run_step(runner: Runner, step: Step, index: int, total: int) -> None:
    """Reuse a completed run, resume an interrupted one, else start it; follow its log."""
    print(f"\n[{index}/{total}] {step.title}  (run {step.name})", flush=True)
    info = find_run(runner, step.name)
    if info and info.get("status") == "completed":
        print(f"  reusing the finished run in {runner.path('runs/' + step.name)}")
        return
    if info and info.get("alive"):
        print("  already running: following it")
    else:
        resume = bool(info and info.get("status"))
        pid = start_job(
            runner, step.job, step.name, list(step.flags), resume=resume, cost_per_hour=0.0
        )
        print(f"  {'resumed' if resume else 'started'} {step.job} (pid {pid})", flush=True)
    follow(runner, step.name)
    info = find_run(runner, step.name) or {}
    if info.get("status") != "completed":
        log = runner.path(f"runs/{step.name}/console.log")
        raise Exit(
            f"{step.job} {step.name!r} ended {info.get('state', 'without a run.json')}. "
            f"See {log}; `fab demo` again resumes it."
        )


def clear(runner: Runner) -> None:
    """--fresh: forget the demo's runs (never anything else)."""
    for step in steps():
        runner.run(f"rm -rf {runner.path('runs/' + step.name)}", warn=True)


def report_path(runner: Runner) -> Path:
    return Path(runner.path("runs/demo-evaluate/report.md"))
