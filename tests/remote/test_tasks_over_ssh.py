"""`fab setup` and `fab ssh` through a real sshd: pinned host keys, idempotent code sync."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for
from remote_harness import (  # noqa: F401
    fab_cli,
    fab_fixture,
    moto_fixture,
    sshd_fixture,
    vm_fixture,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[2]


def test_setup_twice_second_run_does_no_work(fab, vm, sshd):
    uv_log = Path(vm["TINYCLOUD_UV"]).with_name("uv.log")
    first = fab(vm, "setup")
    assert first.code == 0, first.text
    assert "code: 0 file(s)" not in first.out
    assert "environment built from uv.lock" in first.out and "torch backend: auto" in first.out
    assert "pinned packages installed as locked" in first.out  # lockcheck on the host
    calls = uv_log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["venv", "pip"]
    assert "--torch-backend auto" in calls[1] and "-r requirements.txt" in calls[1]
    assert "torch==" in (sshd.work / "requirements.txt").read_text()
    shipped = sshd.work / "remote" / "jobs" / "rundir.py"
    assert shipped.read_bytes() == (ROOT / "remote/jobs/rundir.py").read_bytes()
    assert (sshd.work / "remote" / "__init__.py").exists()
    assert (sshd.work / "serving" / "constants.py").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in sshd.work.rglob("*.py")}

    second = fab(vm, "setup")
    assert second.code == 0, second.text
    assert "code: 0 file(s) updated" in second.out
    assert "environment up to date" in second.out
    assert uv_log.read_text().splitlines() == calls  # uv was not run again
    assert {p: p.stat().st_mtime_ns for p in sshd.work.rglob("*.py")} == mtimes
    python = (sshd.work / ".python").read_text().strip()
    assert python == str(sshd.work / ".venv" / "bin" / "python")
    done = subprocess.run([python, "-c", "import sys"], capture_output=True)
    assert done.returncode == 0, "the environment setup recorded does not run"


def test_a_new_set_of_pins_rebuilds_the_environment_and_groups_are_remembered(fab, vm, sshd):
    uv_log = Path(vm["TINYCLOUD_UV"]).with_name("uv.log")
    assert fab(vm, "setup").code == 0
    before = len(uv_log.read_text().splitlines())
    tracked = fab(vm, "setup", "--groups", "tensorboard")  # another set of pins: rebuilt
    assert tracked.code == 0, tracked.text
    assert "environment built from uv.lock" in tracked.out and "with tensorboard" in tracked.out
    assert len(uv_log.read_text().splitlines()) == before + 2  # uv venv + uv pip install
    assert "tensorboard==" in (sshd.work / "requirements.txt").read_text()
    kept = fab(vm, "setup")
    assert "environment up to date" in kept.out and "with tensorboard" in kept.out, kept.text
    dropped = fab(vm, "setup", "--groups", "none")
    assert "environment built from uv.lock" in dropped.out, dropped.text
    assert "tensorboard" not in (sshd.work / "requirements.txt").read_text()
    unknown = fab(vm, "setup", "--groups", "comet")
    assert unknown.code == 1 and "choose from notebook, tensorboard, mlflow, wandb" in unknown.err


def test_sftp_sync_sends_only_changed_files_and_deletes_stale_ones(fab, vm, sshd):
    stray = sshd.work / "serving" / "stale_module.py"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("# left over from an older checkout\n")
    changed = sshd.work / "remote" / "jobs" / "prompts.py"
    if changed.exists():
        changed.write_text("# edited on the host\n")
    sshd.own(sshd.work)  # as if the login user had left them there
    r = fab(vm, "setup", "--sync", "sftp")
    assert r.code == 0, r.text
    assert "deleted serving/stale_module.py" in r.out
    assert not stray.exists()
    assert changed.read_bytes() == (ROOT / "remote/jobs/prompts.py").read_bytes()
    again = fab(vm, "setup", "--sync", "sftp")
    assert "code: 0 file(s) updated" in again.out, again.text


def test_setup_waits_for_cloud_init_marker(vm, sshd):
    """setup waits while the first boot has left no ready marker, and goes on once it appears.

    The marker is written only after setup has said it is waiting: a timer would race fab's
    own start-up on a loaded machine (setup then found the marker at once and never waited)."""
    marker = sshd.inbox / "ready-later"  # where the login user may look
    env = {**vm, "TINYCLOUD_READY_MARKER": str(marker), "PYTHONUNBUFFERED": "1"}
    proc = fab_cli(env, "setup")
    watchdog = threading.Timer(300, proc.kill)  # setup waits up to 15 min: not the test
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "waiting for cloud-init to finish" in line and not marker.exists():
                marker.write_text("ok\n")
        code = proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
    out = "".join(lines)
    assert code == 0, out
    assert marker.exists(), f"setup never said it was waiting:\n{out}"
    assert out.index("waiting for cloud-init to finish") < out.index("ready: "), out


def test_ssh_prints_a_command_that_logs_in_with_the_pinned_host_key(fab, vm, sshd):
    r = fab(vm, "ssh")
    assert r.code == 0, r.text
    command = r.out.strip()
    assert "UserKnownHostsFile=" in command and "StrictHostKeyChecking=yes" in command
    key = Path(command.split("-i ", 1)[1].split()[0])
    assert key.stat().st_mode & 0o777 == 0o600
    done = subprocess.run(
        f"{command} -o BatchMode=yes 'whoami; echo $HOME'",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [sshd.user, str(_home_of(sshd.user))], sshd.note


def test_the_vm_is_a_dedicated_account_whose_home_is_a_temp_dir(sshd):
    """As root (CI) the stand-in VM must not be root itself; elsewhere the note says why not."""
    if os.geteuid() != 0:  # no useradd without root: the current user, a temp work dir
        assert Path(sshd.remote_dir).parent == sshd.home, sshd.note
        return
    assert sshd.user.startswith("tcvm") and sshd.user != "root", sshd.note
    assert _home_of(sshd.user) == sshd.home and sshd.home.parent == Path("/tmp")
    assert sshd.home.stat().st_uid == pwd.getpwnam(sshd.user).pw_uid
    assert not sshd.remote_dir  # the work dir is ~/tinycloud, found through $HOME


def _home_of(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


def test_wrong_host_key_is_refused(fab, vm, tmp_path):
    outputs = write_outputs(
        tmp_path / "imposter.json",
        **{
            **_outputs(vm),
            "host_public_key": (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICDMZspODPbAxRxQsuwFoVMsGKYfHInW9RlTBU9CjLuX"
            ),
        },
    )
    r = fab({**vm, "TINYCLOUD_STACK_OUTPUTS": str(outputs)}, "status")
    assert r.code == 1
    assert "does not match the pinned one" in r.err


def _outputs(env: dict[str, str]) -> dict:
    return json.loads(Path(env["TINYCLOUD_STACK_OUTPUTS"]).read_text())


# --- a job's life: detached, killed, resumed, followed, fetched, served ------------------------

RUN = "tiny"
# The smallest real pretrain: 1 layer, 32 wide, a 300-token BPE trained on the shipped corpus.
JOB_FLAGS = (
    "--n-layer 1 --n-head 1 --n-embd 32 --block-size 32 --batch-size 2 --vocab-size 300 "
    "--max-steps 600 --eval-interval 25 --eval-iters 1 --log-interval 5 --sample-tokens 4"
)


def _meta(sshd) -> dict:
    try:
        return json.loads((sshd.work / "runs" / RUN / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _job_pid(sshd) -> int:
    return int((sshd.work / "runs" / RUN / ".pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_train_detached_sigkill_then_resume_survives_a_dropped_connection(fab, vm, sshd):
    started = fab(vm, "train", "pretrain", "--name", RUN, "--args", JOB_FLAGS)
    assert started.code == 0, started.text
    assert f"started pretrain '{RUN}'" in started.out
    pid = _job_pid(sshd)
    assert _alive(pid), "fab returned but the job is gone: it was not detached"
    assert Path(f"/proc/{pid}").stat().st_uid == sshd.uid, "the job runs as the login user"
    assert os.getsid(pid) == pid, "the job must lead its own session (setsid)"
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    rate = _outputs(vm)["cost_per_hour"]["running_usd"]
    assert f"TINYCLOUD_COST_PER_HOUR={rate}".encode() in environ, "the stack's price, for run.json"

    twice = fab(vm, "train", "pretrain", "--name", RUN, "--args", JOB_FLAGS)
    assert twice.code == 1 and "is still" in twice.err, twice.text

    # A crash: SIGKILL once a checkpoint exists. run.json still says "running".
    wait_for(
        "a checkpoint",
        lambda: (
            (sshd.work / "runs" / RUN / "ckpt.pt").exists() and (_meta(sshd).get("step") or 0) >= 25
        ),
        every=0.05,
    )
    os.killpg(pid, signal.SIGKILL)
    wait_for("the job to die", lambda: not _alive(pid))
    status = fab(vm, "status")
    assert status.code == 0, status.text
    row = next(line for line in status.out.splitlines() if line.startswith(RUN))
    assert " killed " in row, status.out
    killed_at = _meta(sshd)["step"]
    assert killed_at < 600

    resumed = fab(vm, "train", "pretrain", "--name", RUN, "--resume", "--args", JOB_FLAGS)
    assert resumed.code == 0, resumed.text
    new_pid = _job_pid(sshd)
    # Follow the log from a separate `fab`, then kill that process outright: its SSH
    # connection drops without a goodbye, exactly as a laptop lid closing would.
    follower = fab_cli(vm, "logs", "--run", RUN, "--follow")
    seen: list[str] = []

    def followed_past_the_resume() -> bool:
        line = follower.stdout.readline()
        seen.append(line)
        assert line or follower.poll() is None, f"the follower exited: {''.join(seen)}"
        return "/600 | loss" in line and any(f"resumed {RUN}" in x for x in seen)

    wait_for(
        "the follower to stream a step after the resume",
        followed_past_the_resume,
        timeout=180,
        every=0,
    )
    follower.kill()
    follower.wait(10)
    assert _alive(new_pid), "the job should still be running when the connection drops"

    wait_for("the resumed run to finish", lambda: not _alive(new_pid), timeout=300)
    meta = _meta(sshd)
    assert meta["status"] == "completed", meta
    assert meta["step"] == 600
    log = (sshd.work / "runs" / RUN / "train.log").read_text()
    assert f"resumed {RUN} at step" in log
    final = fab(vm, "status")
    assert " completed " in next(x for x in final.out.splitlines() if x.startswith(RUN))
    assert any(line.startswith("host: ") for line in final.out.splitlines())
    assert "vm: up " in final.out  # the stand-in stack has prices, the VM an uptime


@pytest.mark.slow
def test_fetch_verifies_repairs_and_reports_corruption(fab, vm, sshd):
    wait_for(
        "the trained run",
        lambda: (sshd.work / "runs" / RUN / "manifest.sha256").exists(),
        timeout=5,
    )
    local = Path(vm["TINYCLOUD_LOCAL_RUNS"]) / RUN
    first = fab(vm, "fetch", RUN)
    assert first.code == 0, first.text
    assert (local / "model" / "config.json").exists() and (local / "loss.png").exists()
    manifest = (local / "manifest.sha256").read_text().splitlines()
    assert len(manifest) >= 4
    for line in manifest:
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((local / rel).read_bytes()).hexdigest() == digest

    again = fab(vm, "fetch", RUN)
    assert f"0 fetched, {len(manifest)} already here" in again.out, again.text

    # A local copy damaged after the fact is noticed and fetched again.
    (local / "model" / "config.json").write_text("{ damaged")
    repaired = fab(vm, "fetch", RUN)
    assert repaired.code == 0, repaired.text
    assert "re-fetched model/config.json" in repaired.out
    assert json.loads((local / "model" / "config.json").read_text())["n_layer"] == 1

    # The host's copy damaged: both downloads disagree with the manifest, and fetch says so.
    on_host = sshd.work / "runs" / RUN / "metrics.jsonl"
    original = on_host.read_bytes()
    (local / "metrics.jsonl").unlink()
    try:
        on_host.write_bytes(original + b'{"step": 999, "loss": 0.0}\n')
        broken = fab(vm, "fetch", RUN)
    finally:
        on_host.write_bytes(original)
    assert broken.code == 1
    assert "CORRUPTED" in broken.out and "metrics.jsonl" in broken.err
    assert not (local / "metrics.jsonl").exists(), "a file that fails its digest is not kept"


@pytest.mark.slow
def test_serve_native_then_prompt_tunnel_and_chat(fab, vm, sshd):
    served = fab(vm, "serve", "--run", RUN, "--bind", "127.0.0.1", "--wait", "240")
    try:
        assert served.code == 0, served.text
        key = (Path(vm["TINYCLOUD_HOME"]) / "vmtest" / "api_key").read_text().strip()
        assert len(key) >= 40
        assert key not in served.text, "the API key must never be printed in full"
        assert f"{key[:4]}…" in served.out
        assert "restart loop" in served.out  # no systemd in the test VM, and fab says so
        outputs = json.loads(Path(vm["TINYCLOUD_STACK_OUTPUTS"]).read_text())
        url = outputs["api_url"]

        # The tiny pretrain has no prompt_format.json, so the text goes as is (a 32-token
        # context could not hold the instruction format anyway).
        asked = fab(vm, "prompt", "The quick brown fox", "--max-tokens", "4")
        assert asked.code == 0, asked.text
        assert asked.out.strip(), "the model said nothing at all"
        _assert_key_required(url)

        # prompt.sh as rendered, run as a user would run it.
        script = Path(vm["TINYCLOUD_RENDERED"]) / "vmtest" / "prompt.sh"
        assert script.stat().st_mode & 0o777 == 0o700
        ran = subprocess.run(
            [str(script), "Hello", "3"], capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr

        chat = fab(vm, "chat", "--no-open")
        assert chat.code == 0, chat.text
        page = Path(vm["TINYCLOUD_RENDERED"]) / "vmtest" / "chat.html"
        assert page.stat().st_mode & 0o777 == 0o600
        html = page.read_text()
        assert url in html and key in html  # the page talks to this host with this key

        _check_tunnel(vm, outputs["api_port"])
        _check_restart_on_failure(sshd, url)
    finally:
        stopped = fab(vm, "serve", "--stop")
    assert stopped.code == 0, stopped.text
    assert not (sshd.work / "serve" / "server.pid").exists()


def _assert_key_required(url: str) -> None:
    request = urllib.request.Request(
        f"{url}/generate", data=b'{"inputs": "hi"}', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401


def _check_tunnel(vm: dict[str, str], api_port: int) -> None:
    local_port = free_port()
    tunnel = fab_cli(vm, "tunnel", "--local-port", str(local_port))
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local_port}/health", timeout=5):
                    return True
            except OSError:
                return False

        wait_for("/health through the tunnel", healthy, timeout=60)
    finally:
        tunnel.terminate()
        tunnel.wait(10)
    # fab forwarded the SIGTERM to its ssh: nothing may be left holding the port.
    wait_for("the tunnel's ssh to exit", lambda: not _port_open(local_port), timeout=20)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _check_restart_on_failure(sshd, url: str) -> None:
    """Kill the server process (not its keeper): it must come back by itself."""
    loop = int((sshd.work / "serve" / "server.pid").read_text())
    children = subprocess.run(
        ["pgrep", "-s", str(loop), "-f", "serving.server"], capture_output=True, text=True
    ).stdout.split()
    server = [int(p) for p in children if int(p) != loop]
    assert server, "no server process under the restart loop"
    for pid in server:
        os.kill(pid, signal.SIGKILL)

    def healthy_again() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return True
        except OSError:
            return False

    time.sleep(1)
    wait_for("the server to restart", healthy_again, timeout=180)
