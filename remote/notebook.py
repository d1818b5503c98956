"""`fab notebook`: JupyterLab on the host, in the job environment, reached through SSH.

    fab notebook                 # start it (or find it running) and tunnel to it; Ctrl-C ends that
    fab notebook --stop          # stop the server itself
    fab notebook --target local  # the same on this machine: no tunnel

The server runs detached (its own session, like a job), listens on the host's 127.0.0.1 only
(the security group never sees it), and wants a token: generated once per stack, kept in
``.tinycloud/<stack>/notebook_token`` (0600) and on the host in a 0600 environment file that
Jupyter reads (``JUPYTER_TOKEN``), never on a command line. The kernel imports the jobs
(``PYTHONPATH`` is the work directory, as for `fab train`), writes runs where `fab train` does
(``TINYCLOUD_RUNS``) and knows the machine's price (``TINYCLOUD_COST_PER_HOUR``). The course
notebook (``notebooks/course.ipynb``) is copied to the host the first time, never over a copy
the student has edited.

JupyterLab is the ``notebook`` dependency group (pyproject.toml), not part of the default job
environment: `fab setup --groups notebook` adds it to the host's (see ``NOT_INSTALLED``).
"""

from __future__ import annotations

import shlex
import time

from invoke import Exit

from facts import COST_PER_HOUR_ENV, RUNS_DIR_NAME, RUNS_ENV
from remote import paths
from remote.runner import Runner
from remote.target import Target, stack_secret

q = shlex.quote
PORT = 8888  # Jupyter's own default, on the host's loopback
STATE = "notebook"  # in the work directory: env file, pid, log
ENV_FILE = f"{STATE}/notebook.env"
PID_FILE = f"{STATE}/server.pid"
LOG_FILE = f"{STATE}/server.log"
NOTEBOOKS = "notebooks"  # in the work directory, and in this repository
NOT_INSTALLED = (
    "JupyterLab is not installed in the host's job environment ({python}). It is the optional "
    "`notebook` dependency group in pyproject.toml: add it with `fab setup --groups notebook`, "
    "then run `fab notebook` again. On this machine: `uv run --all-groups fab notebook "
    "--target local`."
)


def token(target: Target) -> str:
    """This stack's notebook token, created on first use."""
    return stack_secret(target, "notebook_token", 24)


def running(runner: Runner) -> bool:
    r = runner.sh(f"test -f {PID_FILE} && kill -0 -- -$(cat {PID_FILE}) 2>/dev/null", warn=True)
    return r.ok


def start(runner: Runner, *, port: int, key: str, cost_per_hour: float | None) -> str:
    """Start JupyterLab detached unless it already runs; how it stands, in words."""
    python = runner.python()
    if not runner.sh(f"{q(python)} -c 'import jupyterlab'", warn=True).ok:
        raise Exit(NOT_INSTALLED.format(python=python))
    if running(runner):
        return "already running"
    copied = ship_notebooks(runner)
    env = {
        "JUPYTER_TOKEN": key,
        "PYTHONPATH": runner.base,  # the jobs import as in `fab train`
        RUNS_ENV: runner.path(RUNS_DIR_NAME),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    if cost_per_hour is not None:
        env[COST_PER_HOUR_ENV] = repr(float(cost_per_hour))
    lines = "".join(f"{k}={q(v)}\n" for k, v in env.items())
    runner.put_bytes(lines.encode(), ENV_FILE, 0o600)
    argv = [
        *(python, "-m", "jupyterlab", "--no-browser", f"--port={int(port)}"),
        *("--ip=127.0.0.1", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={runner.base}"),
    ]
    if runner.run("id -u").stdout.strip() == "0":
        argv.append("--allow-root")  # Jupyter refuses root unless told (a container, CI)
    serve = f"set -a; . ./{ENV_FILE}; set +a; exec {shlex.join(argv)}"
    runner.sh(f"mkdir -p {STATE} {RUNS_DIR_NAME}")
    # Its own line: `a && b &` would background a subshell holding the SSH channel open.
    runner.sh(f"setsid nohup bash -c {q(serve)} </dev/null >>{LOG_FILE} 2>&1 & echo $! >{PID_FILE}")
    wait_ready(runner, python, port)
    return "started" + (f"; copied {', '.join(copied)}" if copied else "")


def ship_notebooks(runner: Runner) -> list[str]:
    """Copy the repository's notebooks to the host, but never over one that is there."""
    copied = []
    for nb in sorted((paths.ROOT / NOTEBOOKS).glob("*.ipynb")):
        rel = f"{NOTEBOOKS}/{nb.name}"
        if not runner.sh(f"test -e {q(rel)}", warn=True).ok:
            runner.put_bytes(nb.read_bytes(), rel)
            copied.append(rel)
    return copied


def wait_ready(runner: Runner, python: str, port: int, timeout: float = 120) -> None:
    """Until ``/api`` answers on the host (it needs no token), or the server's log, failing."""
    check = (
        f"{q(python)} -c {q('import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=3)')}"
        f" http://127.0.0.1:{int(port)}/api"
    )
    deadline = time.monotonic() + timeout
    while not runner.run(check, warn=True).ok:
        if time.monotonic() > deadline or not running(runner):
            tail = runner.sh(f"tail -n 20 {LOG_FILE}", warn=True).stdout
            stop(runner)
            raise Exit(f"JupyterLab did not start on port {port}. The end of its log:\n{tail}")
        time.sleep(1.0)


def stop(runner: Runner) -> bool:
    """Stop the server's whole process group (kernels included); whether one was running."""
    was = running(runner)
    runner.sh(
        f"if [ -f {PID_FILE} ]; then pg=$(cat {PID_FILE}); kill -TERM -- -$pg 2>/dev/null; "
        'for _ in $(seq 50); do kill -0 -- -"$pg" 2>/dev/null || break; sleep 0.2; done; '
        f'kill -KILL -- -"$pg" 2>/dev/null; rm -f {PID_FILE}; fi; true',
        warn=True,
    )
    return was
