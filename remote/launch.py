"""Start a job detached on the target, follow its log, read its state, cancel it.

A job runs in its own session (``setsid nohup``), every stream redirected, its pid written to
``runs/<name>/.pid``: closing the SSH connection, a dropped network or Ctrl-C in `fab` never
reaches it. Its own ``run.json`` is the only progress report (the job contract); ``probe.py``
reads it on the host.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from invoke import Exit

from facts import (
    CONSOLE_LOG,
    COST_PER_HOUR_ENV,
    PID_FILE,
    RUN_NAME_RULE,
    RUNS_DIR_NAME,
    RUNS_ENV,
    TRAIN_LOG,
    VM_BOOT_LOG,
    VM_SETTINGS,
    is_run_name,
)
from remote import paths
from remote.runner import Runner

q = shlex.quote
JOBS = ("pretrain", "finetune", "evaluate")
# Alive and not a zombie; `! grep` is true where there is no /proc (macOS, --target local).
ALIVE_SH = (
    "alive() {{ kill -0 {pid} 2>/dev/null && ! grep -q ') Z ' /proc/{pid}/stat 2>/dev/null; }}"
)


def probe(runner: Runner) -> dict[str, Any]:
    """{"runs": [...], "host": {...}} as ``remote/probe.py`` reports it on the target."""
    py = "python3" if not runner.local else sys.executable
    where = [
        runner.path(RUNS_DIR_NAME),
        paths.env("VM_SETTINGS") or VM_SETTINGS,  # the tests' stand-in VM moves these two
        paths.env("BOOT_LOG") or VM_BOOT_LOG,
    ]
    # Absolute paths and no `cd`: a host with no work directory yet (before `fab setup`) has
    # no runs, which is an answer, not an error.
    r = runner.run(f"{q(py)} -c {q(probe_script())} {shlex.join(where)}")
    return json.loads(r.stdout)


def probe_script() -> str:
    """``probe.py`` with ``facts.py`` bundled in front, as one ``python3 -c`` program: the host
    may have none of our code yet (before `fab setup`), and the facts must be the same ones."""
    facts_source = (paths.ROOT / "facts.py").read_text()
    probe_source = (Path(__file__).parent / "probe.py").read_text()
    return (
        "import sys, types\n"
        "facts = types.ModuleType('facts')\n"
        f"exec(compile({facts_source!r}, 'facts.py', 'exec'), facts.__dict__)\n"
        "sys.modules['facts'] = facts\n"
        f"exec(compile({probe_source!r}, 'probe.py', 'exec'), {{'__name__': '__main__'}})\n"
    )


def find_run(runner: Runner, name: str) -> dict[str, Any] | None:
    return next((r for r in probe(runner)["runs"] if r["name"] == name), None)


def latest_run(runner: Runner, *, with_model: bool = False) -> dict[str, Any]:
    runs = [r for r in probe(runner)["runs"] if r["has_model"] or not with_model]
    if not runs:
        what = "finished run with a model" if with_model else "run"
        raise Exit(f"no {what} on the host yet. Start one with `fab train pretrain`.")
    return max(runs, key=lambda r: r.get("finished_at") or r.get("started_at") or "")


def check_name(name: str) -> str:
    if not is_run_name(name):
        raise Exit(f"run name {name!r}: use {RUN_NAME_RULE}.")
    return name


def job_command(
    python: str, job: str, name: str, args: list[str], *, resume: bool, nproc: int
) -> list[str]:
    """The argv the host runs: ``python -m remote.jobs.<job>``, or under torchrun."""
    if job not in JOBS:
        raise Exit(f"unknown job {job!r}: choose one of {', '.join(JOBS)}.")
    if "--runs-dir" in args or any(a.startswith("--runs-dir=") for a in args):
        raise Exit("--runs-dir is set by fab (TINYCLOUD_RUNS on the host); leave it out.")
    launcher = [python, "-m"]
    if nproc > 1:
        launcher += ["torch.distributed.run", f"--nproc_per_node={nproc}", "-m"]
    extra = ["--resume"] if resume and "--resume" not in args else []
    return [*launcher, f"remote.jobs.{job}", "--name", name, *args, *extra]


def start_job(
    runner: Runner,
    job: str,
    name: str,
    args: list[str],
    *,
    resume: bool = False,
    nproc: int = 0,
    cost_per_hour: float | None = None,
) -> int:
    """Launch detached and return its pid; refuse while another process owns the run.
    ``cost_per_hour`` (USD) reaches the job as TINYCLOUD_COST_PER_HOUR, for its run.json."""
    job_command("python", job, name, args, resume=resume, nproc=nproc)  # bad input: stop now
    check_name(name)
    resume = resume or "--resume" in args
    existing = find_run(runner, name)
    _refuse_clash(name, existing, resume=resume, overwrite="--overwrite" in args)
    argv = job_command(runner.python(), job, name, args, resume=resume, nproc=nproc)
    run_dir = f"{RUNS_DIR_NAME}/{name}"
    env = f"{RUNS_ENV}={q(runner.path(RUNS_DIR_NAME))} PYTHONUNBUFFERED=1"
    if cost_per_hour is not None:
        env += f" {COST_PER_HOUR_ENV}={float(cost_per_hour)!r}"
    script = (
        f"mkdir -p {q(run_dir)} || exit 1; {env} setsid nohup {shlex.join(argv)} "
        f"</dev/null >>{q(run_dir + '/' + CONSOLE_LOG)} 2>&1 & "
        f"echo $! >{q(run_dir + '/' + PID_FILE)}; echo $!"
    )
    pid = int(runner.sh(script).stdout.strip())
    time.sleep(1.0)  # an unknown flag or a missing file kills it at once: say so now
    if not _alive(runner, pid):
        tail = runner.sh(f"tail -n 15 {q(run_dir + '/' + CONSOLE_LOG)}", warn=True).stdout
        raise Exit(f"{job} {name!r} exited at once. The end of its console log:\n{tail}")
    return pid


def _refuse_clash(
    name: str, existing: dict[str, Any] | None, *, resume: bool, overwrite: bool
) -> None:
    if existing and existing["alive"]:
        raise Exit(
            f"run {name!r} is still {existing['state']} (pid {existing['pid']}). Follow it with "
            f"`fab logs --run {name} --follow`, or stop it with `fab cancel {name}`."
        )
    has_meta = bool(existing and existing.get("status"))
    if has_meta and not (resume or overwrite):
        raise Exit(
            f"run {name!r} already exists ({existing['state']}). Continue it with --resume, "
            "start it over with `--args --overwrite`, or pick another --name."
        )
    if resume and not has_meta:
        raise Exit(f"--resume: there is no run {name!r} to continue; drop --resume to start it.")


def _alive(runner: Runner, pid: int) -> bool:
    return runner.run(ALIVE_SH.format(pid=int(pid)) + "; alive", warn=True).ok


def follow(
    runner: Runner, name: str, log: str = TRAIN_LOG, *, poll: float = 1.0, out: TextIO | None = None
) -> bool:
    """Print the log as it grows until the job ends. Ctrl-C stops following, not the job.

    False when the job ended before writing a line of it (it refused its input): the end of
    its console log, where the ``error:`` line is, is printed instead."""
    out = out or sys.stdout
    path = f"{RUNS_DIR_NAME}/{name}/{log}"
    pid_path = f"{RUNS_DIR_NAME}/{name}/{PID_FILE}"
    offset = 0
    try:
        while True:
            alive, chunk, offset = _poll_log(runner, path, pid_path, offset)
            if chunk:
                out.write(chunk)
                out.flush()
            if not alive and not chunk:
                if offset == 0 and log != CONSOLE_LOG:
                    console = f"{RUNS_DIR_NAME}/{name}/{CONSOLE_LOG}"
                    out.write(runner.sh(f"tail -n 15 {q(console)}", warn=True).stdout)
                return offset > 0
            time.sleep(poll if alive else 0)
    except KeyboardInterrupt:
        out.write(
            f"\nstopped following; {name} keeps running. "
            f"`fab logs --run {name} --follow` picks it up again.\n"
        )
        return True


def _poll_log(runner: Runner, path: str, pid_path: str, offset: int) -> tuple[bool, str, int]:
    """(job alive, new text, new offset) in one round trip."""
    script = (
        f"pid=$(cat {q(pid_path)} 2>/dev/null || echo 0); "
        + ALIVE_SH.format(pid="$pid")
        + f"; if alive; then a=1; else a=0; fi; s=$(wc -c 2>/dev/null <{q(path)} || echo 0); "
        f'echo "$a $s"; [ "$s" -gt {offset} ] && tail -c +{offset + 1} {q(path)} '
        f"| head -c $((s - {offset})); true"
    )
    stdout = runner.sh(script).stdout
    header, _, chunk = stdout.partition("\n")
    alive, size = header.split()
    return alive == "1", chunk, max(offset, int(size))


def cancel(runner: Runner, name: str, grace: int = 30) -> tuple[str, str]:
    """SIGTERM the job's process group (it saves a checkpoint), SIGKILL after ``grace`` s.
    Returns ("stopped" or "killed", the job's name)."""
    info = find_run(runner, name)
    if info is None:
        raise Exit(f"no run {name!r} on the host. `fab runs` lists them.")
    if not info["alive"]:
        raise Exit(f"run {name!r} is not running ({info['state']}); nothing to cancel.")
    p = int(info["pid"])
    script = (
        ALIVE_SH.format(pid=p) + f"; kill -TERM -- -{p} 2>/dev/null || kill -TERM {p}; i=0; "
        f"while alive && [ $i -lt {int(grace) * 5} ]; do sleep 0.2; i=$((i+1)); done; "
        f"if alive; then kill -KILL -- -{p} 2>/dev/null || kill -KILL {p}; echo killed; "
        "else echo stopped; fi"
    )
    return runner.sh(script, timeout=int(grace) + 30).stdout.strip(), info.get("job") or "<job>"
