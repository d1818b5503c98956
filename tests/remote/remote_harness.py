"""Fixtures for the control side (a module, not a conftest.py: a second conftest.py would take
the name ``conftest`` from the suite's root one). Test modules import the fixtures they use:

    from remote_harness import fab_fixture, sshd_fixture  # noqa: F401 (pytest fixtures)

They are: a real OpenSSH server standing in for the VM, moto's real
EC2 server, a recorded stack-outputs document pointing at both, and a way to run `fab`.

- ``sshd`` (session): ``/usr/sbin/sshd -D -e`` on a free loopback port with its own ed25519 host
  key and one authorized client key. The login user is a dedicated account created with
  ``useradd`` whose home is a temp dir (the "VM"), when that account can run this checkout's
  Python; where it cannot (the interpreter lives under root's 0700 home, as uv and pyenv put it
  on a root CI box), the current user logs in instead and TINYCLOUD_REMOTE_DIR points the work
  directory at a temp dir. Either way the VM's files are on this machine, so tests can look.
- ``moto`` (session): ``ThreadedMotoServer`` on a free loopback port; boto3 reaches it through
  ``AWS_ENDPOINT_URL`` and fake credentials (the ``aws_env`` dict).
- ``fab(env, *args)``: runs the real `fab` program in-process with ``env`` applied only for the
  call; returns (exit code, stdout, stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
SSHD = "/usr/sbin/sshd"
VENV_PYTHON = str(Path(sys.executable))


@dataclass
class FabResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_fab(capsys, env: dict[str, str], *args: str) -> FabResult:
    """The real `fab` CLI, in this process (fast), with ``env`` set for the call only."""
    from fabric.main import program

    capsys.readouterr()
    with mock.patch.dict(os.environ, env):
        try:
            program.run(["fab", "--search-root", str(ROOT), *args], exit=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return FabResult(code, out, err)


@pytest.fixture(name="fab")
def fab_fixture(capsys):
    return lambda env, *args: run_fab(capsys, env, *args)


def fab_cli(env: dict[str, str], *args: str, **kw) -> subprocess.Popen:
    """`fab` as its own process (for tests that kill it)."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("fab")), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


# --- sshd ----------------------------------------------------------------------------------------


@dataclass
class Sshd:
    port: int
    user: str
    home: Path  # the "VM": its work directory lives under here
    client_key: Path  # OpenSSH private key that may log in
    host_public_key: str  # "ssh-ed25519 AAAA..."
    remote_dir: str  # TINYCLOUD_REMOTE_DIR for this user ("" = ~/tinycloud)
    note: str  # which kind of user logs in, and why

    @property
    def work(self) -> Path:
        return Path(self.remote_dir) if self.remote_dir else self.home / "tinycloud"


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


def _dedicated_user(home: Path) -> str | None:
    """A fresh account with ``home`` as its home, if we may create one and it can run the
    checkout's Python; None otherwise (then the current user stands in)."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        return None
    name = f"tcvm{uuid.uuid4().hex[:6]}"
    made = subprocess.run(
        ["useradd", "--home-dir", str(home), "--no-create-home", "--shell", "/bin/bash", name],
        capture_output=True,
    )
    if made.returncode != 0:
        return None
    uid = pwd.getpwnam(name).pw_uid
    os.chown(home, uid, uid)
    probe = subprocess.run(
        ["runuser", "-u", name, "--", VENV_PYTHON, "-c", "import torch"], capture_output=True
    )
    if probe.returncode == 0:
        return name
    subprocess.run(["userdel", name], capture_output=True)
    return None


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture(tmp_path_factory):
    if not Path(SSHD).exists():
        pytest.skip(
            "OpenSSH server (/usr/sbin/sshd) is not installed: apt-get install openssh-server"
        )
    base = tmp_path_factory.mktemp("sshd")
    home = base / "home"
    home.mkdir(mode=0o755)
    host_pub = _keygen(base / "host_ed25519")
    _keygen(base / "client_ed25519")
    user = _dedicated_user(home)
    if user:
        note, remote_dir = f"dedicated user {user} (home {home})", ""
    else:
        user = pwd.getpwuid(os.getuid()).pw_name
        remote_dir = str(home / "tinycloud")
        note = (
            f"current user {user} with work dir {remote_dir}: a dedicated account could not "
            "run this checkout's Python (it lives under a home only root can enter)"
        )
    auth = base / "authorized_keys"
    auth.write_text((base / "client_ed25519.pub").read_text())
    port = free_port()
    config = base / "sshd_config"
    hf_home = base / "hf"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_ed25519'}\n"
        f"PidFile {base / 'sshd.pid'}\nAuthorizedKeysFile {auth}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"PermitRootLogin prohibit-password\nAllowUsers {user}\n"
        "Subsystem sftp internal-sftp\nMaxSessions 64\nMaxStartups 64\nLogLevel ERROR\n"
        # The stand-in VM has no network either: keep the jobs' libraries offline.
        f"SetEnv HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME={hf_home} "
        "TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    _wait_port(port, proc)
    yield Sshd(port, user, home, base / "client_ed25519", host_pub, remote_dir, note)
    _stop_vm_processes(Path(remote_dir) if remote_dir else home / "tinycloud")
    proc.terminate()
    proc.wait(10)
    if not remote_dir:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", user], capture_output=True)


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {proc.stderr.read().decode()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    pytest.fail("sshd did not start listening within 15s")


def _stop_vm_processes(work: Path) -> None:
    """Kill what the tests left running on the "VM": detached jobs and the server loop."""
    for pid_file in [*work.glob("runs/*/.pid"), work / "serve" / "server.pid"]:
        kill_group(pid_file)


def kill_group(pid_file: Path) -> None:
    """SIGKILL the process group a pid file names, if that process is still ours (a finished
    job's pid may have been reused by something else on this shared machine)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"remote.jobs" in cmdline or b"serving.server" in cmdline:
            os.killpg(pid, signal.SIGKILL)


# --- moto ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="moto")
def moto_fixture():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TINYCLOUD_WAITER_DELAY": "0.2",
    }
    server.stop()


def make_instance(aws_env: dict[str, str], state: str = "running") -> str:
    """A moto EC2 instance in ``state`` (running or stopped); its id."""
    import boto3

    with mock.patch.dict(os.environ, aws_env):
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="m5.large")[
            "Instances"
        ][0]["InstanceId"]
        if state == "stopped":
            ec2.stop_instances(InstanceIds=[iid])
    return iid


# --- the recorded stack outputs, pointed at the test VM --------------------------------------


def recorded_outputs() -> dict:
    return json.loads((DATA / "stack-outputs.json").read_text())


def write_outputs(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**recorded_outputs(), **overrides}, indent=2))
    return path


@pytest.fixture(scope="session", name="vm")
def vm_fixture(sshd, moto, tmp_path_factory) -> dict[str, str]:
    """Environment for `fab` aimed at the test VM through a recorded stack-outputs document:
    host 127.0.0.1, the sshd's host key pinned, its client key as the stack's private key, and
    a running moto instance as the stack's instance."""
    state = tmp_path_factory.mktemp("fab-state")
    api_port = free_port()
    outputs = write_outputs(
        state / "vmtest.json",
        instance_id=make_instance(moto),
        region="us-east-1",
        public_dns="127.0.0.1",
        public_ip="127.0.0.1",
        ssh_user=sshd.user,
        api_port=api_port,
        api_url=f"http://127.0.0.1:{api_port}",
        private_key=sshd.client_key.read_text(),
        host_public_key=sshd.host_public_key,
        allowed_cidrs=["127.0.0.1/32"],
    )
    marker = state / "ready"
    marker.write_text("ready\n")
    return {
        "TINYCLOUD_UV": str(fake_uv(state)),
        **moto,
        "TINYCLOUD_STACK_OUTPUTS": str(outputs),
        "TINYCLOUD_SSH_PORT": str(sshd.port),
        "TINYCLOUD_HOME": str(state / "home"),
        "TINYCLOUD_LOCAL_RUNS": str(state / "runs"),
        "TINYCLOUD_RENDERED": str(state / "rendered"),
        "TINYCLOUD_READY_MARKER": str(marker),
        "TINYCLOUD_REMOTE_DIR": sshd.remote_dir,
        "TINYCLOUD_CURRENT_IP": "127.0.0.1",
    }


def fake_uv(folder: Path) -> Path:
    """A stand-in for uv on the test VM, which (like the tests) has no network: it logs every
    call to ``uv.log`` beside itself, and ``uv venv`` makes ``.venv/bin/python`` run this
    checkout's interpreter. Real uv would download Python and wheels here."""
    script = folder / "uv"
    log = folder / "uv.log"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$1" in
  venv) mkdir -p .venv/bin \\
          && printf '#!/bin/sh\\nexec %s "$@"\\n' {VENV_PYTHON} > .venv/bin/python \\
          && chmod +x .venv/bin/python ;;
  pip) test -s requirements.txt || {{ echo "no requirements.txt" >&2; exit 2; }} ;;
  *) echo "fake uv: unexpected $1" >&2; exit 2 ;;
esac
""")
    script.chmod(0o755)
    return script
