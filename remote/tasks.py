"""The `fab` commands: one task per step of a run's life, from a bare VM to a chat page.

    fab setup                              # wait for the VM, ship code, build the environment
    fab train pretrain --args "--max-steps 2000"   # detached; job flags in --args
    fab status; fab logs --follow          # progress from run.json; the log as it grows
    fab fetch RUN                          # model + metrics + loss.png, verified by sha256
    fab serve --run RUN                    # server + API key + prompt.sh + chat.html
    fab chat                               # open the chat page
    fab stop / fab start                   # stop paying for compute; come back later

Every task that touches the host takes --target/--stack/--host/--user/--key (or the
TINYCLOUD_* environment variables, see remote/paths.py); `--target local` runs the same
jobs on this machine without SSH. Heavy modules (boto3, Jinja2 templates) load inside the
tasks that need them, so `fab --list` stays instant; torch is never imported here.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from invoke import Collection, Exit

from facts import API_PORT, MODEL_DIR, RUNS_DIR_NAME, Output
from remote import paths
from remote.cli import task
from remote.runner import Runner, connect
from remote.target import Target, resolve

HOST_HELP = {
    "target": "remote (default) or local: this machine, no SSH  [TINYCLOUD_TARGET]",
    "stack": "Pulumi stack whose outputs name the host (default: selected)  [TINYCLOUD_STACK]",
    "host": "[user@]host[:port] instead of a stack  [TINYCLOUD_HOST]",
    "user": "SSH user for --host (default: ubuntu)  [TINYCLOUD_USER]",
    "key": "private key file for --host  [TINYCLOUD_KEY]",
}


def _help(**extra: str) -> dict[str, str]:
    return {**extra, **HOST_HELP}


@contextmanager
def _session(
    target: str, stack: str, host: str, user: str, key: str
) -> Iterator[tuple[Target, Runner]]:
    where = resolve(target, stack, host, user, key)
    runner = connect(where)
    try:
        yield where, runner
    finally:
        runner.close()


def _aws(fn: Any, *args: Any) -> Any:
    from remote.lifecycle import LifecycleError

    try:
        return fn(*args)
    except LifecycleError as err:
        raise Exit(str(err)) from None


# --- provision and prepare ---------------------------------------------------------------------


@task(
    help=_help(
        python="use this interpreter on the host and build no environment",
        torch_backend="auto (CUDA where uv finds a driver), cpu, cu126... or pypi (as uv.lock)",
        groups="add optional groups: notebook (fab notebook), tensorboard, mlflow, wandb "
        "(--report-to); comma-separated, none: drop them",
        sync="how to ship code: auto (rsync if both ends have it), rsync or sftp",
        wait="seconds to wait for the first boot (cloud-init) to finish",
    ),
)
def setup(
    c,
    python="",
    torch_backend="auto",
    groups="",
    sync="auto",
    wait=900,
    target="",
    stack="",
    host="",
    user="",
    key="",
):
    """Wait for the host to boot, ship remote/jobs + serving, build the job environment.

    The environment holds exactly what uv.lock pins, on the host's python3. Safe to run again:
    unchanged files are not sent, and an environment built from the same pins is kept.
    A CPU host gets CPU-only torch, a GPU host the CUDA build, both at the locked version.
    """
    from remote.boot import wait_for_boot
    from remote.sync import ensure_env, sync_code

    where = resolve(target, stack, host, user, key)
    if where.instance_id and where.region:
        from remote.lifecycle import ensure_ready

        _aws(ensure_ready, where.region, where.instance_id)
    with connect(where) as runner:
        if not where.local:
            required = where.from_stack or bool(paths.env("READY_MARKER"))
            wait_for_boot(runner, required=required, timeout=wait)
        changed = sync_code(runner, sync)
        print(f"code: {len(changed)} file(s) updated" + _listing(changed))
        built = ensure_env(runner, python=python, torch_backend=torch_backend, groups=groups)
        print(f"python: {built}")
        print(f"ready: {'this machine' if where.local else where.host}:{runner.base}")


def _listing(paths: list[str], most: int = 10) -> str:
    shown = (
        paths if len(paths) <= most + 2 else [*paths[:most], f"... and {len(paths) - most} more"]
    )
    return "".join(f"\n  {p}" for p in shown)


# --- train and watch ---------------------------------------------------------------------------


@task(
    positional=["job"],
    help=_help(
        job="pretrain, finetune or evaluate",
        args='the job\'s own flags, quoted as one string: --args "--max-steps 200 --n-layer 4"',
        name="run name (default: <job>-YYYYmmdd-HHMMSS)",
        follow="stream train.log until the job ends; Ctrl-C stops following, not the job",
        resume="continue the run from its last checkpoint",
        nproc="processes per host under torchrun (one per GPU); 0 = plain python",
    ),
)
def train(
    c,
    job,
    args="",
    name="",
    follow=False,
    resume=False,
    nproc=0,
    target="",
    stack="",
    host="",
    user="",
    key="",
):
    """Start a job detached on the host; its own flags go in --args.

    fab train pretrain --args "--max-steps 2000 --n-layer 6"
    fab train finetune --name ft --args "--model runs/pre/model --dataset alpaca-1k"
    A dropped connection never stops it; a second job on the same run is refused.
    """
    from remote.costs import job_rate
    from remote.launch import follow as follow_log
    from remote.launch import start_job

    try:
        job_flags = shlex.split(args)
    except ValueError as err:
        raise Exit(f"--args {args!r}: {err}. Quote it as one shell word.") from None
    name = name or _pop_flag(job_flags, "--name") or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _session(target, stack, host, user, key) as (where, runner):
        rate = job_rate(where)  # USD/hour into the job's run.json: 0 here, the stack's on a VM
        pid = start_job(
            runner, job, name, job_flags, resume=resume, nproc=nproc, cost_per_hour=rate
        )
        print(f"started {job} {name!r} (pid {pid}) in {runner.path('runs/' + name)}")
        if follow and not follow_log(runner, name):
            raise Exit(f"{job} {name!r} ended before its run started (its console log above).")
        if not follow:
            print(f"follow it: fab logs --run {name} --follow   progress: fab status")


def _pop_flag(args: list[str], flag: str) -> str:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(flag + "="):
            del args[i]
            return a.split("=", 1)[1]
    return ""


@task(
    iterable=["compare"],
    help=_help(
        compare="runs to put side by side, comma-separated: --compare ft-100,ft-500 "
        "(a table, and a PNG plot drawn on the host)",
        plot="where to save the comparison plot (default: runs/compare_A_vs_B.png)",
    ),
)
def runs(c, compare=None, plot="", target="", stack="", host="", user="", key=""):
    """List the runs with their state, time and cost; --compare puts chosen runs side by side.

    fab runs --compare ft-100,ft-500,ft-1000   # data size, steps, time, tokens/s, val loss, cost
    """
    from remote import compare as cmp
    from remote.launch import probe
    from remote.report import compare_table, runs_table

    wanted = cmp.names(compare) if compare else []
    with _session(target, stack, host, user, key) as (_where, runner):
        if not wanted:
            print(runs_table(probe(runner)["runs"]))
            return
        print(compare_table(cmp.pick(runner, wanted)))
        out = Path(plot) if plot else cmp.default_plot(paths.local_runs_dir(), wanted)
        print(f"plot: {cmp.plot(runner, wanted, out)}")


@task(
    help=_help(
        run="the run (default: the latest)",
        follow="keep printing until the job ends",
        console="show console.log (raw output, tracebacks) instead of train.log",
        lines="how many lines to show first",
    ),
)
def logs(
    c, run="", follow=False, console=False, lines=40, target="", stack="", host="", user="", key=""
):
    """Show a run's train.log (or --console output); --follow streams it."""
    from facts import CONSOLE_LOG, TRAIN_LOG
    from remote.launch import follow as follow_log
    from remote.launch import latest_run

    log = CONSOLE_LOG if console else TRAIN_LOG
    with _session(target, stack, host, user, key) as (_where, runner):
        name = run or latest_run(runner)["name"]
        if follow:
            follow_log(runner, name, log)
            return
        path = f"{RUNS_DIR_NAME}/{name}/{log}"
        r = runner.sh(f"tail -n {int(lines)} {shlex.quote(path)}", warn=True)
        if not r.ok:
            raise Exit(f"no {log} for run {name!r} yet. `fab runs` lists the runs.")
        print(r.stdout, end="")


@task(help=_help())
def status(c, target="", stack="", host="", user="", key=""):
    """Each run's state, step, loss, tokens/s, time, cost and ETA; the host; what it has cost.

    Under the runs: the host's CPU, memory and disk; the VM's running time and cost since its
    last start; the stack's total since `pulumi up`; and when the run-time cap stops the VM.
    """
    from remote import costs
    from remote.launch import probe
    from remote.report import host_line, status_table

    with _session(target, stack, host, user, key) as (where, runner):
        report = probe(runner)
    print(status_table(report["runs"]))
    print(host_line(report["host"]))
    for line in costs.vm_lines(report["host"], costs.rates(where)):
        print(line)
    costs.save_boots(where, report["host"])


@task(
    positional=["run"],
    help=_help(run="the run to stop", grace="seconds to let it save a checkpoint before SIGKILL"),
)
def cancel(c, run, grace=30, target="", stack="", host="", user="", key=""):
    """Stop a running job: SIGTERM (it checkpoints), SIGKILL after --grace seconds."""
    from remote.launch import cancel as cancel_run

    with _session(target, stack, host, user, key) as (_where, runner):
        how, job = cancel_run(runner, run, grace)
        print(f"{run}: {how}. Continue it later with `fab train {job} --name {run} --resume`.")


@task(
    positional=["run"],
    help=_help(run="the run to download", dest="where to put it (default: runs/<run>)"),
)
def fetch(c, run, dest="", target="", stack="", host="", user="", key=""):
    """Download a run's model, metrics, loss.png and reports, verified by sha256.

    Resumable: files already here with the right digest are skipped.
    """
    from remote.fetch import fetch_run
    from remote.launch import check_name

    name = check_name(run)
    out = Path(dest) if dest else paths.local_runs_dir() / name
    with _session(target, stack, host, user, key) as (_where, runner):
        report = fetch_run(runner, name, out)
    for rel in report.repaired:
        print(f"  re-fetched {rel}: the local copy did not match the manifest")
    print(f"{name} -> {out}: {report.summary()}")
    if report.corrupted:
        raise Exit(
            "these files do not match the run's manifest even after a second download:\n"
            + "".join(f"  {r}\n" for r in report.corrupted)
            + "The copy on the host is damaged or was changed after the run finished. Check it "
            f"with `sha256sum -c manifest.sha256` in runs/{name} on the host (`fab ssh --open`)."
        )


# --- serve and talk ----------------------------------------------------------------------------


@task(
    iterable=["run"],
    help=_help(
        run="a run whose model/ to serve (default: the latest with a model); repeat it to serve "
        "several from one server: --run base-run --run sft-run (each picked by its name)",
        with_base="also serve the model the first --run started from (base vs fine-tuned)",
        engine="native (python -m serving.server) or tgi (Docker, launch_gpt2.sh; one run)",
        quantize="int8: dynamic int8 weights (native engine, CPU)",
        port="API port (default: the stack's api_port, 8080)",
        bind="address to listen on (default: 0.0.0.0 on a VM, 127.0.0.1 locally)",
        stop="stop whatever is serving and exit",
        wait="seconds to wait for /health",
    ),
)
def serve(
    c,
    run=None,
    with_base=False,
    engine="native",
    quantize="",
    port=0,
    bind="",
    stop=False,
    wait=300,
    target="",
    stack="",
    host="",
    user="",
    key="",
):
    """Serve runs' models behind the stack's API key; render prompt.sh and chat.html.

    Several --run (and --with-base) share one native server: each is picked by its run's name
    (`adapter_id` on /generate, `model` on /v1), and the chat page's compare mode sets them side
    by side. LoRA runs share one copy of their base. A set that would not fit in memory is
    refused before anything loads. The native engine runs as a systemd service (restarts on
    failure and at boot); TGI runs from the rendered launch_gpt2.sh. The key is kept in
    .tinycloud/<stack>/api_key (0600).
    """
    from remote import serve as srv

    names = [n for r in run or [] for n in r.split(",") if n]
    if engine == "tgi" and (len(names) > 1 or with_base):
        raise Exit("--engine tgi serves one run; serve several with --engine native.")
    with _session(target, stack, host, user, key) as (where, runner):
        if stop:
            srv.stop_servers(runner)
            print("stopped serving")
            return
        infos = _servable_runs(runner, names)
        models = srv.model_flags(infos, runner.path, with_base)
        model_dir = runner.path(f"{RUNS_DIR_NAME}/{infos[0]['name']}/{MODEL_DIR}")
        port = int(port) or (API_PORT if where.local else where.api_port)
        api_key = srv.api_key(where)
        if engine == "native":
            print(srv.check_plan(runner, models, quantize))
        how = _start_engine(runner, where, engine, models, model_dir, port, bind, quantize, api_key)
        both = " and the base of the first" if with_base else ""
        print(f"serving {', '.join(i['name'] for i in infos)}{both} with {how}")
        took = srv.wait_healthy(runner, port, wait)
        url = _api_url(where, port)
        fmt = srv.remote_prompt_format(runner, model_dir)
        served = {"run": infos[0]["name"], "engine": engine, "url": url, "prompt_format": fmt}
        srv.save_served(where, {**served, "runs": [i["name"] for i in infos]})
    print(f"healthy after {took:.0f}s at {url}  (API key {srv.mask(api_key)})")
    _render_clients(where, url, api_key, fmt)


def _servable_runs(runner: Runner, names: list[str]) -> list[dict[str, Any]]:
    """The named runs' infos (default: the latest with a model), each with a finished model."""
    from remote.launch import check_name, find_run, latest_run

    if not names:
        return [latest_run(runner, with_model=True)]
    if len(set(names)) < len(names):
        raise Exit(f"--run {' --run '.join(names)}: each run once.")
    infos = []
    for name in names:
        info = find_run(runner, check_name(name))
        if not info or not info["has_model"]:
            raise Exit(f"run {name!r} has no model/ on the host yet. `fab status` shows the runs.")
        infos.append(info)
    return infos


def _start_engine(
    runner: Runner,
    where: Target,
    engine: str,
    models: list[str],
    model_dir: str,
    port: int,
    bind: str,
    quantize: str,
    api_key: str,
) -> str:
    from remote import serve as srv

    if quantize not in ("", "int8"):
        raise Exit(f"--quantize {quantize!r}: only int8 is supported.")
    gpu = not where.local and runner.has_command("nvidia-smi")
    if engine == "native":
        bind = bind or ("127.0.0.1" if where.local else "0.0.0.0")  # noqa: S104 (the SG limits who)
        argv = srv.native_argv(
            runner.python(), models, bind=bind, port=port, quantize=quantize, gpu=gpu
        )
        return srv.start_native(runner, argv, api_key)
    if engine == "tgi":
        if quantize:
            raise Exit("--quantize int8 is the native engine's; drop it for TGI.")
        from remote.render import render_launch_script

        n_positions = _n_positions(runner, model_dir)
        script = render_launch_script(
            model_dir=model_dir, api_port=port, api_key=api_key, gpu=gpu, n_positions=n_positions
        )
        return srv.start_tgi(runner, script)
    raise Exit(f"--engine {engine!r}: use native or tgi.")


def _n_positions(runner: Runner, model_dir: str) -> int:
    import json

    text = runner.read_text(f"{model_dir}/config.json") or "{}"
    return int(json.loads(text).get("n_positions") or 1024)


def _api_url(where: Target, port: int) -> str:
    if where.local:
        return f"http://127.0.0.1:{port}"
    if port == where.api_port:
        return where.api_url
    return f"http://{where.outputs.get(Output.PUBLIC_DNS) or where.host}:{port}"


def _render_clients(where: Target, url: str, api_key: str, fmt: dict | None) -> Path:
    from remote.render import render_chat_page, render_prompt_script

    script = render_prompt_script(where, url, api_key, fmt)
    page = render_chat_page(where, url, api_key, fmt)
    if fmt:
        how = f'./{script.name} "Name three colors." 50; --raw skips the prompt format'
    else:
        how = f'./{script.name} "The quick brown fox" 20; no prompt format: sent as typed'
    print(f"prompt script: {script}   ({how})")
    print(f"chat page:     {page}   (fab chat opens it)")
    return page


@task(
    positional=["text"],
    help=_help(
        text="what to ask",
        max_tokens="the most tokens to generate",
        raw="send the text as is (the default for a model without prompt_format.json)",
        model="which served run to ask, when `fab serve --run A --run B` served several "
        "(default: the first)",
        url="API base URL (default: what `fab serve` served; e.g. the `fab tunnel` port)",
    ),
)
def prompt(
    c,
    text,
    max_tokens=64,
    raw=False,
    model="",
    url="",
    target="",
    stack="",
    host="",
    user="",
    key="",
):
    """Ask a served model one question through the API (POST /generate)."""
    from remote.api import generate
    from remote.serve import api_key, load_served

    where = resolve(target, stack, host, user, key)
    served = load_served(where)
    base = (url or served.get("url") or where.api_url).rstrip("/")
    secret = api_key(where)
    fmt = _prompt_format_of(base, secret, model) if model else served.get("prompt_format")
    if raw or ((served or model) and not fmt):
        inputs = text  # a pretrained-only model never learned the instruction format
    else:
        from remote.jobs.prompts import format_prompt

        inputs = format_prompt(text)
    answer = generate(base, secret, inputs, int(max_tokens), model=model)
    print(answer.get("generated_text", "").strip())


def _prompt_format_of(url: str, secret: str | None, model: str) -> dict | None:
    """The prompt format the server reports for ``model``; an `Exit` naming what it serves if
    ``model`` is not among them."""
    from remote.api import served_models

    cards = served_models(url, secret)
    for card in cards:
        if card.get("id") == model:
            return card.get("prompt_format")
    ids = ", ".join(repr(c.get("id")) for c in cards) or "nothing"
    raise Exit(f"--model {model!r} is not served at {url}; it serves {ids}. See `fab status`.")


@task(
    help=_help(
        open="open the page in the default browser (--no-open: print its path)",
        url="API base URL to bind the page to (default: what `fab serve` served)",
    ),
)
def chat(c, open=True, url="", target="", stack="", host="", user="", key=""):
    """Render the chat page for this stack and open it in the browser."""
    from remote.serve import api_key, load_served

    where = resolve(target, stack, host, user, key)
    served = load_served(where)
    base = (url or served.get("url") or where.api_url).rstrip("/")
    page = _render_clients(where, base, api_key(where), served.get("prompt_format"))
    if open:
        import webbrowser

        if not webbrowser.open(page.resolve().as_uri()):
            print("no browser found here; open the file above by hand")


@task(help=_help(local_port="port on this machine (default: the API port)"))
def tunnel(c, local_port=0, target="", stack="", host="", user="", key=""):
    """Forward the API port over SSH, for when it is closed to the internet. Ctrl-C ends it."""
    where = resolve(target, stack, host, user, key)
    if where.local:
        raise Exit("--target local needs no tunnel: the API is already on 127.0.0.1.")
    local = int(local_port) or where.api_port
    print(
        f"forwarding http://127.0.0.1:{local} -> {where.host}:{where.api_port} "
        f'(fab prompt --url http://127.0.0.1:{local} "..."); Ctrl-C to stop',
        flush=True,
    )
    code = _forward(where, local, where.api_port)
    if code is not None and code != 0:
        raise Exit(f"the tunnel ended (ssh exit {code}); run `fab tunnel` again.", code=code)


def _forward(where: Target, local: int, remote: int) -> int | None:
    """ssh -L 127.0.0.1:local -> the host's 127.0.0.1:remote until it ends (its exit code) or
    Ctrl-C / SIGTERM here (None), with the same key and pinned host key as every task."""
    from remote.foreground import run_until_stopped

    argv = where.ssh_argv(
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ServerAliveInterval=15",  # a dead link ends the tunnel in a minute, not never
        "-o",
        "ServerAliveCountMax=4",
        "-L",
        f"127.0.0.1:{int(local)}:127.0.0.1:{int(remote)}",
    )
    return run_until_stopped(argv)


def _free_local_port(first: int) -> int:
    """``first``, or the next port free on this machine's loopback: a laptop often has its own
    Jupyter on 8888 already."""
    import socket

    for port in range(first, first + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise Exit(f"no free port from {first} to {first + 99} here; pass --local-port N.")


@task(
    help=_help(
        stop="stop the notebook server (and its kernels) and exit",
        port="the server's port on the host's 127.0.0.1 (default 8888)",
        local_port="port on this machine for the tunnel (default: --port, or the next free)",
    ),
)
def notebook(c, stop=False, port=0, local_port=0, target="", stack="", host="", user="", key=""):
    """JupyterLab on the host in the job environment, through an SSH tunnel. Ctrl-C ends it.

    The server keeps running detached (notebooks, kernels and jobs in them too) until
    `fab notebook --stop`; run `fab notebook` again to reconnect. It listens on the host's
    127.0.0.1 only and wants the token in the printed URL. Ships notebooks/course.ipynb.
    """
    from remote import notebook as nb
    from remote.costs import job_rate

    where = resolve(target, stack, host, user, key)
    port = int(port) or nb.PORT
    with connect(where) as runner:
        if stop:
            print("stopped the notebook server" if nb.stop(runner) else "no notebook server ran")
            return
        how = nb.start(runner, port=port, key=nb.token(where), cost_per_hour=job_rate(where))
        base = runner.path(nb.NOTEBOOKS)
    local = port if where.local else int(local_port) or _free_local_port(port)
    url = f"http://127.0.0.1:{local}/lab/tree/{nb.NOTEBOOKS}/course.ipynb?token={nb.token(where)}"
    print(f"JupyterLab {how}: notebooks in {base}")
    if where.local:
        print(f"open {url}")
        print("it keeps running; stop it with `fab notebook --stop --target local`")
        return
    print(f"open {url}")
    print(
        "Ctrl-C ends the tunnel; the server keeps running (`fab notebook` reconnects, "
        "`fab notebook --stop` stops it)",
        flush=True,
    )
    code = _forward(where, local, port)
    if code is not None and code != 0:
        raise Exit(f"the tunnel ended (ssh exit {code}); run `fab notebook` again.", code=code)


@task(
    help=_help(open="open an interactive shell instead of printing the command"),
)
def ssh(c, open=False, target="", stack="", host="", user="", key=""):
    """Print the exact ssh command for the host (pinned host key, stack key), or --open it."""
    where = resolve(target, stack, host, user, key)
    if where.local:
        raise Exit("--target local is this machine; there is nothing to ssh to.")
    argv = where.ssh_argv()
    if not open:
        print(shlex.join(argv))
        return
    sys.stdout.flush()
    code = subprocess.run(argv).returncode
    if code not in (0, 130):
        raise Exit(code=code)


@task(help=_help())
def doctor(c, target="", stack="", host="", user="", key=""):
    """Pre-flight checks on one screen, each ✓ or ✗ with the exact fix (? = could not tell).

    Pulumi CLI, backend login, stack, passphrase and outputs; AWS credentials, region and
    the vCPU quota for the instance type; your IP in allowedCidrs; key and known_hosts; the
    instance running, the VM reachable, booted and set up. Changes nothing.
    """
    from remote.doctor import diagnose, report

    failed = report(diagnose(target, stack, host, user, key))
    if failed:
        raise Exit(f"{failed} check(s) failed: fix the first ✗, then run `fab doctor` again.")


# --- instance lifecycle ------------------------------------------------------------------------


@task(help={"stack": HOST_HELP["stack"]})
def start(c, stack=""):
    """Start the stopped instance and wait for it (running, status checks ok)."""
    from remote.lifecycle import start as start_instance

    where = _aws_target(stack)
    dns = _aws(start_instance, where.region, where.instance_id)
    print(f"{where.instance_id} is running at {dns or where.host} (same address: Elastic IP)")


@task(help={"stack": HOST_HELP["stack"]})
def stop(c, stack=""):
    """Stop the instance: compute billing stops, the disk and its runs stay. Says what it cost.

    Before stopping it reads the VM's uptime and boot log (over SSH, when it answers), so it
    can say what this start and the whole stack have cost, and what a stopped VM still costs.
    """
    from remote import costs
    from remote.lifecycle import launch_time
    from remote.lifecycle import stop as stop_instance

    where = _aws_target(stack)
    launched = _aws(launch_time, where.region, where.instance_id)
    host = _host_report(where) if launched is not None else {}
    state = _aws(stop_instance, where.region, where.instance_id)
    print(f"{where.instance_id} is {state}. `fab start` brings it back.")
    for line in costs.spent_lines(where, host, launched):
        print(line)


def _host_report(where: Target) -> dict:
    """The host part of the probe, or {} when the VM does not answer (then `fab stop` says
    what it knows from EC2 and the last boot log it read)."""
    from remote import costs
    from remote.launch import probe

    try:
        with connect(where) as runner:
            host = probe(runner)["host"]
    except Exit as why:
        print(f"(could not read the VM's boot log: {str(why.message).splitlines()[0]})")
        return {}
    costs.save_boots(where, host)
    return host


def _aws_target(stack: str) -> Target:
    from remote.target import stack_target

    where = stack_target(stack or paths.env("STACK"))
    if not (where.instance_id and where.region):
        raise Exit("the stack outputs name no instance_id/region. Run `pulumi up` first.")
    return where


# --- the offline quick start -------------------------------------------------------------------


@task(
    help={
        "fresh": "forget the demo's earlier runs and start again",
        "scale": "multiply every step count by this (0.05: a one-minute smoke run)",
        "port": "API port on 127.0.0.1 (default 8080)",
        "question": "what to ask the served model at the end",
    },
)
def demo(c, fresh=False, scale="1", port=0, question=""):
    """Offline quick start on this machine: pretrain, fine-tune, evaluate, serve, chat page.

    No cloud account, no network: the shipped corpus and instruction set. Runs the same jobs
    and server `fab train` and `fab serve` run on a VM. Re-running reuses finished steps.
    """
    from remote import demo as d
    from remote.api import generate
    from remote.jobs.prompts import format_prompt
    from remote.serve import api_key, load_served

    d.check_local_environment()
    where = resolve("local", "", "", "", "")
    jobs = d.steps(float(scale))
    total = len(jobs) + 1
    with connect(where) as runner:
        if fresh:
            d.clear(runner)
        for i, step in enumerate(jobs, 1):
            d.run_step(runner, step, i, total)
        report = d.report_path(runner)
    print(
        f"\n[{total}/{total}] serve the fine-tuned model and its base, render the chat page",
        flush=True,
    )
    serve(c, run=["demo-finetune"], with_base=True, port=port, target="local")
    url = load_served(where)["url"]
    question = question or d.QUESTION
    answer = generate(url, api_key(where), format_prompt(question), 48)["generated_text"]
    page = paths.rendered_dir() / where.state_dir.name / "chat.html"
    print(
        "\ntinycloud demo is up\n"
        f"  chat page   {page}   (open it, or `fab chat --target local`)\n"
        f"  server      {url}   (stop: `fab serve --stop --target local`)\n"
        "  compare     tick demo-pretrain beside demo-finetune under Compare in the page\n"
        f"  evaluation  {report}\n"
        f"  Q: {question}\n"
        f"  A: {answer.strip()}"
    )


ns = Collection(
    setup,
    train,
    runs,
    logs,
    status,
    cancel,
    fetch,
    serve,
    prompt,
    chat,
    tunnel,
    notebook,
    ssh,
    start,
    stop,
    demo,
    doctor,
)
