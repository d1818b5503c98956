"""The VM side for real: the user data `pulumi up` renders, booted under systemd on the stand-in
image (vm_harness), then driven with `fab` as the README tells a user to.

The tests run in order on one booted machine (each step needs the one before): `fab setup`
waiting for the first boot, what that boot did, the pinned host key, a fine-tune, serving, the
chat page, Docker, the idle auto-stop with a reboot from the same disk, the run-time cap's boot
log, and last the cap stopping a job and powering the VM off.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import tgi_standin
from conftest import ROOT, chat_in_chromium, free_port, wait_for
from vm_harness import (  # noqa: F401 (pytest fixtures)
    MAX_RUN_HOURS,
    STACK,
    booted_vm_fixture,
    fab_fixture,
)

from facts import (
    API_PORT,
    RUNS_ENV,
    SSH_USER,
    VM_BOOT_LOG,
    VM_KEEP_AWAKE,
    VM_READY_MARKER,
    VM_RUNS_DIR,
    VM_SETTINGS,
    VM_WORK_DIR,
)
from infra import cloud_init
from remote.notebook import PORT as NOTEBOOK_PORT
from serving.constants import DEFAULT_IMAGE
from tests.remote.remote_harness import fab_cli

# One machine, tests in order (each needs the one before): under pytest-xdist this file must stay
# on one worker, as `--dist loadfile` keeps it (plain `-n` would scatter its tests).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

VENV_PYTHON = f"{VM_WORK_DIR}/.venv/bin/python"
# The optional groups the VM gets: JupyterLab for `fab notebook`, a tracker for --report-to.
OPTIONAL = ("notebook", "tensorboard")


def test_setup_waits_for_the_first_boot_and_installs_exactly_what_uv_lock_pins(fab, booted_vm):
    # As EC2's status checks do, wait for sshd; cloud-init is still installing Docker then.
    wait_for("sshd", lambda: _port_open(booted_vm.ip, 22), 120, 0.5)
    # PyTorch's CPU index is out of reach here: torch comes from PyPI, as uv.lock has it.
    setup = ("setup", "--torch-backend", "pypi", "--groups", ",".join(OPTIONAL))
    first = fab(booted_vm.env, *setup)
    assert first.code == 0, first.text
    assert "waiting for cloud-init to finish (status: running" in first.out, first.out
    assert "environment built from uv.lock" in first.out
    assert f"with {', '.join(OPTIONAL)}" in first.out, first.out
    assert re.search(r"all \d+ pinned packages installed as locked", first.out), first.out
    assert " + tensorboard==" in first.err and " + jupyterlab==" in first.err  # uv's list
    installed = _installed(booted_vm)
    locked = _locked_for(booted_vm, ("train", "serve", *OPTIONAL))
    assert installed == locked, "the VM's environment differs from uv.lock"
    python = booted_vm.root(f"readlink -f {VM_WORK_DIR}/.venv/bin/python").stdout
    assert python.strip().startswith("/usr/bin/python3"), "not the host's own python3"

    again = fab(booted_vm.env, "setup", "--torch-backend", "pypi")  # the groups are remembered
    assert again.code == 0, again.text
    assert "code: 0 file(s) updated" in again.out and "environment up to date" in again.out


def test_first_boot_runs_the_user_data_cleanly(booted_vm):
    vm = booted_vm
    waited = vm.wait_for_cloud_init()
    assert "status: done" in waited, (
        waited + vm.root("tail -40 /var/log/cloud-init-output.log").stdout
    )
    report = json.loads(vm.root("cloud-init status --long --format json").stdout)
    assert report["errors"] == [], report
    assert report["recoverable_errors"] == {}, report  # no WARNING, no DEPRECATED key
    assert vm.root("systemctl --failed --no-legend --plain").stdout.strip() == ""
    units = (
        "tinycloud-activity.service tinycloud-idle.timer tinycloud-cap.timer "
        "docker.service ssh.service"
    )
    assert vm.root(f"systemctl is-active {units}").stdout.split() == ["active"] * 5
    assert vm.root(f"test -e {VM_READY_MARKER}").returncode == 0
    settings = vm.root(f"cat {VM_SETTINGS}").stdout
    assert f"TINYCLOUD_MAX_RUN_HOURS={MAX_RUN_HOURS}" in settings.splitlines(), settings

    runs = vm.root(f"stat -c '%U:%G' {VM_RUNS_DIR}").stdout.strip()
    assert runs == f"{SSH_USER}:{SSH_USER}"
    environment = vm.root("cat /etc/environment").stdout
    assert f"{RUNS_ENV}={VM_RUNS_DIR}" in environment.splitlines()

    # The host key is the rendered one and the only one; the login key is the stack's.
    host_keys = vm.root("cat /etc/ssh/ssh_host_*_key.pub").stdout.splitlines()
    assert [" ".join(k.split()[:2]) for k in host_keys] == [vm.host_public_key]
    authorized = vm.root(f"cat /home/{SSH_USER}/.ssh/authorized_keys").stdout
    assert vm.login_public_key in authorized
    groups = vm.root(f"id -nG {SSH_USER}").stdout.split()
    assert {"sudo", "docker"} <= set(groups)
    assert vm.root("docker info --format '{{.ServerVersion}}'").stdout.strip()
    assert vm.root("uv --version").stdout.startswith("uv ")


def test_a_machine_with_another_host_key_is_refused(fab, booted_vm, tmp_path):
    """The stack pins the key it rendered; a machine that shows any other key is not trusted."""
    wait_for("sshd", lambda: _port_open(booted_vm.ip, 22), 120, 0.5)  # when run on its own
    _, other_key = cloud_init.new_ed25519_keypair()
    outputs = json.loads(booted_vm.outputs_path.read_text())
    imposter = tmp_path / f"{STACK}.json"
    imposter.write_text(json.dumps({**outputs, "host_public_key": other_key}))
    env = {**booted_vm.env, "TINYCLOUD_STACK_OUTPUTS": str(imposter)}
    env["TINYCLOUD_HOME"] = str(tmp_path / "home")
    refused = fab(env, "status")
    assert refused.code == 1
    assert "does not match the pinned one" in refused.err, refused.text


def test_fab_notebook_reaches_jupyterlab_on_the_vm_through_its_tunnel(fab, booted_vm):
    """The `notebook` group `fab setup --groups notebook` added: JupyterLab runs on the VM,
    on its loopback only, and this machine reaches it through `fab notebook`'s SSH tunnel."""
    local = free_port()
    proc = fab_cli(booted_vm.env, "notebook", "--local-port", str(local))
    try:
        url = next((line.split()[1] for line in proc.stdout if line.startswith("open http")), "")
        assert url.startswith(f"http://127.0.0.1:{local}/lab/"), "fab notebook printed no URL"
        token = url.split("token=")[1]
        status = f"http://127.0.0.1:{local}/api/status"
        auth = {"Authorization": f"token {token}"}
        wait_for("JupyterLab through the tunnel", lambda: _get(status, auth) == 200, 90, 1)
        assert _get(status, {}) == 403, "the server must want its token"
    finally:
        proc.terminate()  # what Ctrl-C does: the tunnel ends, the server stays
        proc.wait(30)
    listening = booted_vm.root(f"ss -ltnH 'sport = :{NOTEBOOK_PORT}'").stdout
    local_addresses = {line.split()[3] for line in listening.splitlines() if line.strip()}
    assert local_addresses == {f"127.0.0.1:{NOTEBOOK_PORT}"}, listening
    assert not _port_open(booted_vm.ip, NOTEBOOK_PORT), "JupyterLab must not face the network"
    stopped = fab(booted_vm.env, "notebook", "--stop")
    assert stopped.code == 0 and "stopped the notebook server" in stopped.out, stopped.text


def _get(url: str, headers: dict[str, str]) -> int:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _installed(vm) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = vm.root(f'{VENV_PYTHON} -c "{script}"').stdout
    return {_canonical(k): v for k, v in json.loads(out).items()}


def _locked_for(vm, groups: tuple[str, ...]) -> dict[str, str]:
    """What uv.lock resolves the groups to on the VM's Python and platform, read from the lock
    itself (not from `fab`'s own export): each package reachable from the groups whose
    dependency markers hold there, at the version the lock gives it."""
    from packaging.markers import Marker

    env = json.loads(
        vm.root(
            f'{VENV_PYTHON} -c "import json; from packaging.markers import default_environment '
            'as e; print(json.dumps(e()))"'
        ).stdout
    )
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    by_name: dict[str, list[dict]] = {}
    for package in lock["package"]:
        by_name.setdefault(package["name"], []).append(package)
    project = by_name["tinycloud"][0]
    todo = [dep for g in groups for dep in project["dev-dependencies"][g]]
    found: dict[str, str] = {}
    extras_done: set[tuple[str, str]] = set()
    while todo:
        dep = todo.pop()
        if "marker" in dep and not Marker(dep["marker"]).evaluate(env):
            continue
        candidates = by_name[dep["name"]]
        if "version" in dep:
            candidates = [p for p in candidates if p["version"] == dep["version"]]
        package = candidates[0] if len(candidates) == 1 else _by_markers(candidates, env)
        name = _canonical(package["name"])
        if name not in found:
            found[name] = package["version"]
            todo += package.get("dependencies", [])
        for extra in dep.get("extra", []):
            if (name, extra) not in extras_done:
                extras_done.add((name, extra))
                todo += package.get("optional-dependencies", {}).get(extra, [])
    return found


def _by_markers(candidates: list[dict], env: dict) -> dict:
    from packaging.markers import Marker

    fits = [
        p
        for p in candidates
        if any(
            Marker(m).evaluate(env) for m in p.get("resolution-markers", ["python_version > '0'"])
        )
    ]
    assert len(fits) == 1, [p["version"] for p in fits]
    return fits[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


RUN = "vm-finetune"
DATASET = f"{VM_WORK_DIR}/remote/jobs/data/instructions.jsonl"  # shipped by setup


def _finetune_flags(model: str, *extra: str) -> str:
    return " ".join([f"--model {model} --dataset {DATASET}", *extra])


def test_a_tracker_setup_did_not_add_is_refused_before_the_run_starts(
    fab, booted_vm, tiny_model_dir
):
    model = booted_vm.upload(tiny_model_dir, "inbox/model")
    flags = _finetune_flags(model, "--limit 24 --max-steps 2 --report-to wandb")
    refused = fab(
        booted_vm.env, "train", "finetune", "--name", "vm-wandb", "--follow", "--args", flags
    )
    assert refused.code == 1, refused.text
    assert "fab setup --groups wandb" in refused.out, refused.text
    run_dir = booted_vm.home() / "tinycloud/runs/vm-wandb"
    assert not (run_dir / "run.json").exists(), "refused before its run started"


def test_finetune_status_logs_and_a_verified_fetch(fab, booted_vm):
    model = f"/home/{SSH_USER}/inbox/model"
    flags = _finetune_flags(
        model, "--limit 24 --max-steps 3 --batch-size 4 --report-to tensorboard"
    )
    train = fab(booted_vm.env, "train", "finetune", "--name", RUN, "--follow", "--args", flags)
    assert train.code == 0, train.text
    assert f"started finetune {RUN!r}" in train.out

    status = fab(booted_vm.env, "status")
    assert status.code == 0, status.text
    row = next(line for line in status.out.splitlines() if line.startswith(RUN))
    assert "completed" in row and "3/3" in row.replace(" ", ""), status.out
    assert "host: " in status.out

    logs = fab(booted_vm.env, "logs", "--run", RUN, "--lines", "5")
    assert logs.code == 0 and "model saved to" in logs.out, logs.text

    run_on_vm = booted_vm.home() / "tinycloud/runs" / RUN
    assert list((run_on_vm / "tensorboard").glob("events.out.tfevents.*")), "no tensorboard events"
    fetched = fab(booted_vm.env, "fetch", RUN)
    assert fetched.code == 0, fetched.text
    local = Path(booted_vm.env["TINYCLOUD_LOCAL_RUNS"]) / RUN
    rows = [line.split("  ", 1) for line in (local / "manifest.sha256").read_text().splitlines()]
    assert any(rel == "model/model.safetensors" for _, rel in rows)
    for digest, rel in rows:
        assert _sha256(local / rel) == digest == _sha256(run_on_vm / rel), rel
    again = fab(booted_vm.env, "fetch", RUN)
    assert f"0 fetched, {len(rows)} already here" in again.out, again.text


def test_serve_prompt_and_the_chat_page_in_chromium(fab, booted_vm, tmp_path):
    served = fab(booted_vm.env, "serve", "--run", RUN, "--wait", "240")
    assert served.code == 0, served.text
    assert "systemd service tinycloud-serve (restarts on failure and at boot)" in served.out
    assert f"at {booted_vm.api_url}" in served.out
    assert booted_vm.root("systemctl is-enabled tinycloud-serve").stdout.strip() == "enabled"

    asked = fab(booted_vm.env, "prompt", "Name a primary colour.", "--max-tokens", "6")
    assert asked.code == 0, asked.text

    page = Path(booted_vm.env["TINYCLOUD_RENDERED"]) / STACK / "chat.html"
    chat_in_chromium(page, booted_vm.api_url, tmp_path / "vm-chat.png")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_bootstraps_docker_runs_containers_for_the_login_user(fab, booted_vm):
    """Docker as cloud-init left it: enabled, and `ubuntu` (in the docker group) runs a
    container from a stand-in image (made here: no registry is reachable) with a published
    port, a volume and a restart policy. launch_gpt2.sh itself meets a real engine in
    test_launch_script.py: Docker here cannot honour its --cpus (see docs/infra.md)."""
    why = tgi_standin.missing()
    if why:
        pytest.skip(why)
    vm = booted_vm
    assert vm.root("systemctl is-enabled docker.service").stdout.strip() == "enabled"
    tar = tgi_standin.build_tar(vm.machine.root / "var/tmp/tgi-standin.tar")
    changes = " ".join(f"--change {shlex.quote(c)}" for c in tgi_standin.IMPORT_CHANGES)
    vm.root(f"docker import {changes} /var/tmp/{tar.name} {DEFAULT_IMAGE}; rm /var/tmp/{tar.name}")
    ssh = shlex.split(fab(vm.env, "ssh").out.strip())
    run = (
        f"mkdir -p ~/probe-data && docker run --detach --name tgi-probe --restart unless-stopped "
        f"--publish {PROBE_PORT}:80 --volume $HOME/probe-data:/data {DEFAULT_IMAGE} --model-id /m"
    )
    started = subprocess.run([*ssh, "-o", "BatchMode=yes", run], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        wait_for("the container's /health", lambda: _healthy(vm, PROBE_PORT), 60)
        assert (vm.home() / "probe-data/tgi-args").read_text().split() == ["--model-id", "/m"]
        policy = vm.root("docker inspect --format '{{.HostConfig.RestartPolicy.Name}}' tgi-probe")
        assert policy.stdout.strip() == "unless-stopped"
    finally:
        vm.root("docker rm -f tgi-probe")


PROBE_PORT = 8081  # the API port (8080) is the native server's


IDLE_S, TICK = 10, 2  # the test knob: power off after 10 s idle, checked every 2 s


def test_idle_auto_stop_for_real_and_the_runs_survive_a_reboot(fab, booted_vm):
    vm = booted_vm
    _shorten_idle_time(vm)
    hold = IDLE_S + 3 * TICK  # longer than the limit, with a check or two to spare

    # A running job keeps it up (and nothing else is happening meanwhile).
    flags = _finetune_flags(f"/home/{SSH_USER}/inbox/model", "--max-steps 5000")
    keep_awake = VM_KEEP_AWAKE  # while torch loads, before run.json says so
    vm.root(f"touch {keep_awake}")
    busy = fab(vm.env, "train", "finetune", "--name", "vm-busy", "--args", flags)
    assert busy.code == 0, busy.text
    wait_for("the job to run", lambda: _run_status(vm, "vm-busy") == "running", 180)
    vm.root(f"rm {keep_awake}")
    _stays_up(vm, hold, "busy: job vm-busy")
    cancelled = fab(vm.env, "cancel", "vm-busy")
    assert cancelled.code == 0, cancelled.text

    # An open SSH session keeps it up, quiet as it is.
    ssh = fab(vm.env, "ssh")
    session = subprocess.Popen([*shlex.split(ssh.out.strip()), "-o", "BatchMode=yes", "sleep 600"])
    try:
        _stays_up(vm, hold, "busy: open SSH session")
    finally:
        session.terminate()
        session.wait(30)

    # API traffic keeps it up.
    end = time.monotonic() + hold
    mark = _journal_cursor(vm)
    while time.monotonic() < end:
        assert httpx.get(f"{vm.api_url}/health", timeout=5).status_code == 200
        time.sleep(2)
    assert vm.machine.running and "busy: SSH/API traffic" in _idle_journal(vm, mark)

    # Nothing: it powers itself off.
    started = time.monotonic()
    code = vm.machine.wait_stopped(IDLE_S + 6 * TICK + 60)
    assert code == 0, f"not powered off ({code}):\n{vm.machine.console_tail()}"
    took = time.monotonic() - started
    assert took >= IDLE_S - TICK, f"powered off after {took:.0f}s, before its idle time"

    # Booted again from the same disk (without the test's knob): everything is still there.
    _drop_idle_knob(vm)
    vm.boot()
    status = wait_for("SSH after the reboot", lambda: _fab_ok(fab, vm.env, "status"), 120, 2)
    rows = {line.split()[0]: line for line in status.out.splitlines()[1:] if line.split()}
    assert "completed" in rows[RUN] and "interrupted" in rows["vm-busy"], status.out
    last_boot = vm.root("journalctl -b -1 -t tinycloud-idle -o cat --no-pager").stdout
    assert "powering off" in last_boot, last_boot
    wait_for("the server to come back at boot", lambda: _healthy(vm), 180, 2)
    assert vm.root("systemctl is-active tinycloud-activity.service").stdout.strip() == "active"
    assert vm.root("systemctl --failed --no-legend --plain").stdout.strip() == ""


DROP_INS = {
    "tinycloud-idle.service.d/zz-test.conf": (
        f"[Service]\nEnvironment=TINYCLOUD_IDLE_TEST_SECONDS={IDLE_S}\n"
    ),
    "tinycloud-idle.timer.d/zz-test.conf": (
        # One empty assignment resets every trigger of the unit; then the test's own.
        f"[Timer]\nOnBootSec=\nOnActiveSec={TICK}s\nOnUnitActiveSec={TICK}s\nAccuracySec=1s\n"
    ),
}


def _shorten_idle_time(vm) -> None:
    """The tests' knob: systemd drop-ins on the VM (what the user configures is minutes)."""
    for rel, text in DROP_INS.items():
        path = vm.machine.root / "etc/systemd/system" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    vm.root("systemctl daemon-reload && systemctl restart tinycloud-idle.timer")


def _drop_idle_knob(vm) -> None:
    for rel in DROP_INS:
        (vm.machine.root / "etc/systemd/system" / rel).unlink()


def _stays_up(vm, seconds: float, reason: str) -> None:
    mark = _journal_cursor(vm)
    time.sleep(seconds)
    assert vm.machine.running, f"it powered off although {reason!r}"
    journal = _idle_journal(vm, mark)
    assert reason in journal, journal


def _journal_cursor(vm) -> str:
    return vm.root("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()


def _idle_journal(vm, since: str) -> str:
    return vm.root(f"journalctl -u tinycloud-idle --no-pager -o cat --since '{since}'").stdout


def _run_json(vm, name: str) -> dict:
    """The run's run.json on the VM's disk ({} until the job has written it)."""
    try:
        return json.loads((vm.home() / f"tinycloud/runs/{name}/run.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_status(vm, name: str) -> str:
    return _run_json(vm, name).get("status", "")


def _fab_ok(fab, env, *args):
    result = fab(env, *args)
    return result if result.code == 0 else None


def _port_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _healthy(vm, port: int = API_PORT) -> bool:
    try:
        return httpx.get(f"http://{vm.ip}:{port}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_run_time_cap_logs_each_boot_and_minds_max_run_hours(fab, booted_vm):
    """tinycloud-cap, as its timer runs it (its first run is a minute after boot; started here,
    the same oneshot service): after the reboot above, the boot log `fab status` sums holds
    the first boot's line (written by the timer while it ran) and this boot's; and, far below
    the 12-hour cap, nothing was stopped. The time counted is the VM's own: this machine's
    /proc/uptime is the host's, which may be past the cap already."""
    vm = booted_vm
    ran = vm.root("systemctl start tinycloud-cap.service", check=False)
    assert ran.returncode == 0, ran.stderr + vm.root("journalctl -u tinycloud-cap -o cat").stdout
    boot_id = vm.root("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    lines = [line.split() for line in vm.root(f"cat {VM_BOOT_LOG}").stdout.splitlines()]
    mine = [fields for fields in lines if fields[0] == boot_id]
    assert len(mine) == 1 and int(mine[0][1]) <= int(mine[0][2]), lines
    assert int(mine[0][2]) - int(mine[0][1]) < 1800, f"not this boot's own uptime: {mine}"
    assert len({fields[0] for fields in lines}) >= 2, f"the first boot is not logged: {lines}"
    said = vm.root("journalctl -u tinycloud-cap.service -o cat --no-pager").stdout
    assert f"of {MAX_RUN_HOURS * 60} min" in said and "powering off" not in said, said
    assert vm.machine.running
    status = fab(vm.env, "status")  # `fab status` counts the same time as the cap
    cap = next(x for x in status.out.splitlines() if x.startswith("cap: the VM stops itself"))
    hours, minutes, _ = (int(n) for n in cap.split()[5].split(":"))
    assert (MAX_RUN_HOURS - 1) * 60 < hours * 60 + minutes < MAX_RUN_HOURS * 60, cap


CAP_KNOB = "tinycloud-cap.service.d/zz-test.conf"
FAKE_UPTIME = "/run/tinycloud-test-uptime"


def test_past_the_cap_the_running_job_checkpoints_and_the_vm_powers_off(fab, booted_vm):
    """The cap for real, last (the VM stays off): past maxRunHours, tinycloud-cap, run as its
    timer runs it, asks the running fine-tune to stop; the job saves a checkpoint and ends
    interrupted (`--resume` carries on), and then the VM powers itself off. The test's knobs:
    a cap of 1 hour, set as a user changes it on a running VM (the settings file), and the
    uptime the cap reads (a file saying 61 minutes, by a systemd drop-in)."""
    vm = booted_vm
    flags = _finetune_flags(f"/home/{SSH_USER}/inbox/model", "--max-steps 5000")
    started = fab(vm.env, "train", "finetune", "--name", "vm-capped", "--args", flags)
    assert started.code == 0, started.text
    run_dir = vm.home() / "tinycloud/runs/vm-capped"
    wait_for("a step of the job", lambda: (_run_json(vm, "vm-capped").get("step") or 0) >= 1,
             240, 1)  # fmt: skip
    assert _run_status(vm, "vm-capped") == "running"

    knob = vm.machine.root / "etc/systemd/system" / CAP_KNOB
    knob.parent.mkdir(parents=True, exist_ok=True)
    knob.write_text(f"[Service]\nEnvironment=TINYCLOUD_UPTIME_FILE={FAKE_UPTIME}\n")
    vm.root(
        f"echo '3660.00 0.00' > {FAKE_UPTIME}"
        f" && sed -i 's/^TINYCLOUD_MAX_RUN_HOURS=.*/TINYCLOUD_MAX_RUN_HOURS=1/' {VM_SETTINGS}"
        " && systemctl daemon-reload && systemctl start --no-block tinycloud-cap.service"
    )
    code = vm.machine.wait_stopped(300)
    assert code == 0, f"not powered off ({code}):\n{vm.machine.console_tail()}"

    # Read from the powered-off disk: the job stopped as asked, with a checkpoint to resume.
    assert _run_status(vm, "vm-capped") == "interrupted", _run_json(vm, "vm-capped")
    assert "got SIGTERM: stopping at the next safe point" in (run_dir / "train.log").read_text()
    said = (run_dir / "console.log").read_text()  # the job's stderr, as `fab logs` shows it
    assert "interrupted by SIGTERM; continue with --resume --name vm-capped" in said, said[-2000:]
    saved = [c for c in (run_dir / "checkpoints").glob("checkpoint-*")
             if (c / "trainer_state.json").is_file()]  # fmt: skip
    assert saved, sorted(p.name for p in run_dir.rglob("*"))
    journal = subprocess.run(
        ["journalctl", "-D", str(vm.machine.root / "var/log/journal"), "-t", "tinycloud-cap",
         "-o", "cat", "--no-pager"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    said = journal.stdout
    assert "the cap is 1 h (maxRunHours): stopping" in said, journal.stdout + journal.stderr
    assert said.index("asking job group") < said.index("powering off"), said
