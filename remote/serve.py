"""Run the inference server on the target, behind the stack's API key.

- native: ``python -m serving.server`` as a systemd service (``Restart=on-failure``, enabled at
  boot) where the host has systemd and passwordless sudo, which a tinycloud VM does; elsewhere
  (a container, ``--target local``) a detached restart loop, which does not survive a reboot.
- tgi: the rendered ``launch_gpt2.sh`` (Docker), as in the course handout.

The API key is generated once per stack (``secrets.token_urlsafe``), kept locally in a 0600 file
and on the host in a 0600 environment file the server reads (``TINYCLOUD_API_KEY``), so it never
appears in a process list, a unit file or `fab`'s output.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Exit

from facts import API_KEY_ENV, MODEL_DIR, RUNS_DIR_NAME
from remote.runner import Runner
from remote.target import Target, stack_secret, write_secret

q = shlex.quote
SERVE_DIR = "serve"  # in the work directory: the env file, pid, log, rendered launch script
SERVICE_NAME = "tinycloud-serve"  # the systemd unit of the native engine
ENV_FILE = f"{SERVE_DIR}/serve.env"
PID_FILE = f"{SERVE_DIR}/server.pid"
LOG_FILE = f"{SERVE_DIR}/server.log"
LAUNCH_SCRIPT = f"{SERVE_DIR}/launch_gpt2.sh"
UNIT_PATH = f"/etc/systemd/system/{SERVICE_NAME}.service"
HAS_SYSTEMD = "[ -d /run/systemd/system ] && command -v systemctl >/dev/null && sudo -n true"


def api_key(target: Target) -> str:
    """This stack's API key, created on first use."""
    return stack_secret(target, "api_key", 32)


def mask(key: str) -> str:
    """Enough to tell two keys apart, too little to use."""
    return f"{key[:4]}…{key[-2:]} ({len(key)} chars)"


def model_flags(
    runs: list[dict[str, Any]], path: Callable[[str], str], with_base: bool
) -> list[str]:
    """The server's ``--model``/``--adapter`` flags for these runs (probe's run infos), each
    served under its run's name: a LoRA run as an adapter over its base (one copy of the base
    for all of them, as TGI's multi-LoRA), a full fine-tune as a model of its own. The first
    run is the server's default. ``with_base`` adds the model the first run started from."""
    several = len(runs) > 1 or with_base  # alone, a LoRA run's merged model decodes faster
    flags: list[str] = []
    for info in runs:
        model_dir = path(f"{RUNS_DIR_NAME}/{info['name']}/{MODEL_DIR}")
        kind = "--adapter" if several and info.get("lora") else "--model"
        flags += [kind, f"{info['name']}={model_dir}"]
    if with_base:
        base = runs[0].get("base")
        if not base:
            raise Exit(
                f"--with-base: run {runs[0]['name']} started from no base model (a pretrain run "
                "starts from scratch). Name the runs to compare with --run instead."
            )
        flags += ["--model", base]  # as the job read it: the server runs in the same work dir
    return flags


def check_plan(runner: Runner, models: list[str], quantize: str) -> str:
    """The server's own ``--plan`` for these models on the host: what loads, as which id, and the
    memory it needs. A plan that does not fit stops `fab serve` here, before any server is
    stopped or any weight read, with the server's words on what would fit."""
    argv = [runner.python(), "-m", "serving.server", *models, "--plan"]
    if quantize:
        argv += ["--quantize", quantize]
    res = runner.sh(shlex.join(argv), warn=True, timeout=300)
    if not res.ok:
        said = (res.stderr or res.stdout).strip().removeprefix("error: ")
        raise Exit(f"the server would refuse these models: {said}")
    return res.stdout.strip()


def native_argv(
    python: str, models: list[str], *, bind: str, port: int, quantize: str, gpu: bool
) -> list[str]:
    argv = [
        python,
        "-m",
        "serving.server",
        *models,
        "--host",
        bind,
        "--port",
        str(port),
        "--cors-origin",
        "null",
    ]  # "null": the page opened from disk
    if quantize:
        argv += ["--quantize", quantize]
    if gpu and not quantize:
        argv += ["--device", "cuda"]
    return argv


def systemd_unit(argv: list[str], *, user: str, workdir: str, env_file: str) -> str:
    exec_start = " ".join(_systemd_quote(a) for a in argv)
    return (
        "[Unit]\nDescription=tinycloud inference server (native engine)\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        f"[Service]\nUser={user}\nWorkingDirectory={_systemd_quote(workdir)}\n"
        f"EnvironmentFile={_systemd_quote(env_file)}\nExecStart={exec_start}\n"
        "Restart=on-failure\nRestartSec=3\n\n[Install]\nWantedBy=multi-user.target\n"
    )


def _systemd_quote(arg: str) -> str:
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'\\;"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def start_native(runner: Runner, argv: list[str], key: str) -> str:
    """Start (or restart) the native server; how it is kept running, in words."""
    stop_servers(runner)
    runner.put_bytes(f"{API_KEY_ENV}={key}\n".encode(), ENV_FILE, 0o600)
    if not runner.local and runner.run(HAS_SYSTEMD, warn=True).ok:
        user = runner.run("id -un").stdout.strip()
        unit = systemd_unit(argv, user=user, workdir=runner.base, env_file=runner.path(ENV_FILE))
        runner.put_bytes(unit.encode(), f"{SERVE_DIR}/{SERVICE_NAME}.service")
        name = SERVICE_NAME
        runner.sh(
            f"sudo -n install -m 0644 {SERVE_DIR}/{name}.service {UNIT_PATH} && "
            f"sudo -n systemctl daemon-reload && sudo -n systemctl enable --quiet {name} && "
            f"sudo -n systemctl restart {name}"
        )
        return f"systemd service {name} (restarts on failure and at boot)"
    loop = (
        f"set -a; . ./{ENV_FILE}; set +a; while :; do {shlex.join(argv)}; "
        'echo "tinycloud: server exited ($?); restarting in 3s"; sleep 3; done'
    )
    pid = runner.sh(
        f"setsid nohup bash -c {q(loop)} </dev/null >>{LOG_FILE} 2>&1 & "
        f"echo $! >{PID_FILE}; echo $!"
    ).stdout.strip()
    return (
        f"a restart loop (pid {pid}): this host has no systemd (or no passwordless sudo), "
        "so the server restarts on failure but not after a reboot"
    )


def start_tgi(runner: Runner, script: str) -> str:
    """Upload the rendered launch_gpt2.sh and run it (it pulls the image the first time)."""
    if not runner.has_command("docker"):
        raise Exit(
            "--engine tgi needs Docker on the host, and it has none. "
            "Use --engine native, or a tinycloud VM (cloud-init installs Docker)."
        )
    stop_servers(runner)
    runner.put_bytes(script.encode(), LAUNCH_SCRIPT, 0o700)  # it holds the API key
    runner.sh(f"./{LAUNCH_SCRIPT}", hide=False, timeout=1800)
    return "TGI container (docker restart policy)"


def stop_servers(runner: Runner) -> None:
    """Whatever served before: the systemd unit, a restart loop, or the TGI container.

    Returns once they are gone: an old server still draining its requests would answer the
    next `/health` check in place of the new one (`systemctl --now` and `docker rm -f` wait by
    themselves; the restart loop's process group is waited for here, then killed).
    """
    name = SERVICE_NAME
    from serving.constants import DEFAULT_CONTAINER_NAME

    runner.sh(
        f"if [ -f {PID_FILE} ]; then pg=$(cat {PID_FILE}); kill -TERM -- -$pg 2>/dev/null; "
        'for _ in $(seq 75); do kill -0 -- -"$pg" 2>/dev/null || break; sleep 0.2; done; '
        f'kill -KILL -- -"$pg" 2>/dev/null; rm -f {PID_FILE}; fi; '
        f"if [ -f {UNIT_PATH} ] && sudo -n true 2>/dev/null; then "
        f"sudo -n systemctl disable --now --quiet {name}; fi; "
        f"if command -v docker >/dev/null; then "
        f"docker rm -f {DEFAULT_CONTAINER_NAME} >/dev/null 2>&1 || "
        f"sudo -n docker rm -f {DEFAULT_CONTAINER_NAME} >/dev/null 2>&1; fi; true",
        warn=True,
    )


def wait_healthy(runner: Runner, port: int, timeout: float, progress: Any = print) -> float:
    """Poll ``/health`` from the host itself (works with the API port closed); seconds taken."""
    check = (
        f"{q(runner.python())} -c "
        f"{q('import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=3)')} "
        f"http://127.0.0.1:{int(port)}/health"
    )
    start = time.monotonic()
    last_note = start
    while True:
        if runner.run(check, warn=True, hide=True).ok:
            return time.monotonic() - start
        now = time.monotonic()
        if now - start > timeout:
            tail = runner.sh(
                f"tail -n 25 {LOG_FILE} 2>/dev/null || "
                f"sudo -n journalctl -u {SERVICE_NAME} -n 25 --no-pager",
                warn=True,
            ).stdout
            raise Exit(
                f"the server did not answer /health within {timeout:.0f}s. "
                f"The end of its log:\n{tail}"
            )
        if now - last_note >= 10:
            progress(f"  waiting for /health ({now - start:.0f}s)")
            last_note = now
        time.sleep(1.0)


def remote_prompt_format(runner: Runner, model_dir: str) -> dict[str, Any] | None:
    """The served model's prompt_format.json, if its fine-tune wrote one."""
    from remote.jobs.prompts import PROMPT_FORMAT_FILE

    text = runner.read_text(f"{model_dir}/{PROMPT_FORMAT_FILE}")
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def save_served(target: Target, info: dict[str, Any]) -> Path:
    """Remember what is being served, so `fab chat` and `fab prompt` need no SSH."""
    path = target.state_dir / "served.json"
    write_secret(path, json.dumps(info, indent=2))
    return path


def load_served(target: Target) -> dict[str, Any]:
    path = target.state_dir / "served.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
