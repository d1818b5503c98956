"""Fixtures for the control side (a module, not a conftest.py: a second conftest.py would take
the name ``conftest`` from the suite's root one). Test modules import the fixtures they use:

    from remote_harness import fab_fixture, sshd_fixture  # noqa: F401 (pytest fixtures)

They are: a real OpenSSH server standing in for the VM, moto's real
EC2 server, a recorded stack-outputs document pointing at both, and a way to run `fab`.

- ``sshd`` (session): ``/usr/sbin/sshd -D -e`` on a free loopback port with its own ed25519 host
  key and one authorized client key. The login user is a dedicated account made with
  ``useradd`` whose home is a 0755 temp dir under /tmp (the "VM"). Where the interpreter lives
  under a folder others may not enter (root's 0700 home, as uv and pyenv put it on a root CI
  box), the account gets traverse-only ACL entries (``setfacl -m u:NAME:x``) on just those
  folders. Teardown kills the account's processes, removes the ACL entries, the account and
  its home. Without root (a laptop) the current user logs in instead and TINYCLOUD_REMOTE_DIR
  points the work directory into the temp home (``Sshd.note`` says which and why); as root with
  ``CI`` set, failing to make the account fails the tests. Either way the VM's files are on
  this machine, so tests can look; files a job must read go through ``Sshd.hand_over``.
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
import tempfile
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


# A pretrain small enough to run in seconds (add --max-steps N).
TINY_PRETRAIN = (
    "--n-layer 1 --n-head 1 --n-embd 32 --block-size 32 --batch-size 2 --vocab-size 300 "
    "--eval-interval 5 --eval-iters 1 --log-interval 1 --sample-tokens 4"
)


@pytest.fixture(name="local")
def local_fixture(tmp_path):
    """`--target local` with its state and fetched runs in this test's temp dir."""
    yield {
        "TINYCLOUD_TARGET": "local",
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_LOCAL_RUNS": str(tmp_path / "runs"),
    }
    for pid_file in (tmp_path / "state" / "local" / "work" / "runs").glob("*/.pid"):
        kill_group(pid_file)  # a failed test must not leave a 5000-step job behind


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
    uid: int
    gid: int

    @property
    def work(self) -> Path:
        return Path(self.remote_dir) if self.remote_dir else self.home / "tinycloud"

    @property
    def inbox(self) -> Path:
        """A folder on the "VM" the login user owns: files the tests hand to jobs go here."""
        return self.home / "inbox"

    def own(self, path: Path) -> Path:
        """Give ``path`` (and all below it) to the login user, as if it had made it."""
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.lchown(p, self.uid, self.gid)
        return path

    def hand_over(self, src: Path) -> Path:
        """A copy of ``src`` (file or folder) in the inbox, for a job on the "VM" to read: the
        tests' own temp dirs are private to the user running pytest."""
        dest = self.inbox / src.name
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return self.own(dest)


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


class NoDedicatedUser(Exception):
    """Why the stand-in VM cannot get an account of its own."""


def _closed_dirs() -> list[Path]:
    """Folders on the way to this checkout and its interpreter that other users may not enter
    (``/root`` where pyenv or uv installed Python): the account needs to pass through them."""
    closed: set[Path] = set()
    for target in (Path(sys.executable).resolve(), ROOT):
        for folder in target.parents:
            if not folder.stat().st_mode & 0o001:
                closed.add(folder)
    return sorted(closed)


def _grant_traverse(name: str, folder: Path) -> None:
    done = subprocess.run(
        ["setfacl", "-m", f"u:{name}:x", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise NoDedicatedUser(f"setfacl -m u:{name}:x {folder} failed: {done.stderr.strip()}")


def _revoke_traverse(uid: int, folder: Path) -> None:
    """Take the entry away again (by uid: it must outlive the name); drop the ACL altogether
    when only the mask setfacl added is left, so the folder is exactly as it was."""
    subprocess.run(["setfacl", "-x", f"u:{uid}", str(folder)], capture_output=True)
    acl = subprocess.run(
        ["getfacl", "-cp", str(folder)], capture_output=True, text=True
    ).stdout.splitlines()
    if not any(line.split(":")[1] for line in acl if line.startswith(("user:", "group:"))):
        subprocess.run(["setfacl", "-b", str(folder)], capture_output=True)


def _remove_account(name: str, granted: list[Path]) -> None:
    """Kill everything the account still runs (detached jobs, the server loop), take back its
    grants, then delete it; userdel refuses while a process of the user is alive, so retry."""
    uid = pwd.getpwnam(name).pw_uid
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
    for folder in granted:
        _revoke_traverse(uid, folder)
    for _ in range(50):
        if subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6):
            return  # 6: no such user
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        time.sleep(0.1)
    subprocess.run(["userdel", "--force", name], capture_output=True)


@contextlib.contextmanager
def _dedicated_user(home: Path):
    """A fresh account whose home is ``home``, allowed through just the folders between it and
    this checkout's Python; removed (with its processes and grants) on exit."""
    if os.geteuid() != 0:
        raise NoDedicatedUser("creating an account needs root")
    for tool in ("useradd", "userdel", "runuser", "setfacl", "getfacl"):
        if not shutil.which(tool):
            raise NoDedicatedUser(f"{tool} is not installed (apt-get install passwd acl)")
    name = f"tcvm{uuid.uuid4().hex[:6]}"
    # Password "*": no password login, yet not "locked" ("!"), which sshd would refuse.
    made = subprocess.run(
        ["useradd", "--home-dir", str(home), "--no-create-home", "--shell", "/bin/bash"]
        + ["--password", "*", "--user-group", name],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise NoDedicatedUser(f"useradd failed: {made.stderr.strip()}")
    granted: list[Path] = []
    try:
        for folder in _closed_dirs():
            _grant_traverse(name, folder)
            granted.append(folder)
        entry = pwd.getpwnam(name)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        probe = subprocess.run(
            ["runuser", "-u", name, "--", VENV_PYTHON, "-c", "import torch"],
            capture_output=True,
            text=True,
            cwd=home,
        )
        if probe.returncode != 0:
            raise NoDedicatedUser(f"{name} cannot run {VENV_PYTHON}: {probe.stderr.strip()[-300:]}")
        yield entry
    finally:
        _remove_account(name, granted)


def _login_user(stack: contextlib.ExitStack, home: Path) -> tuple[pwd.struct_passwd, str, str]:
    """The account that logs in, its TINYCLOUD_REMOTE_DIR, and a note saying which it is."""
    try:
        entry = stack.enter_context(_dedicated_user(home))
        return entry, "", f"dedicated user {entry.pw_name} (home {home})"
    except NoDedicatedUser as why:
        if os.geteuid() == 0 and os.environ.get("CI"):
            pytest.fail(f"CI runs as root, so the stand-in VM must be a dedicated account: {why}")
        entry = pwd.getpwuid(os.getuid())
        work = str(home / "tinycloud")
        return entry, work, f"current user {entry.pw_name} with work dir {work}: {why}"


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture(tmp_path_factory):
    if not Path(SSHD).exists():
        pytest.skip(
            "OpenSSH server (/usr/sbin/sshd) is not installed: apt-get install openssh-server"
        )
    base = tmp_path_factory.mktemp("sshd")  # sshd's own files: private to the test user
    host_pub = _keygen(base / "host_ed25519")
    _keygen(base / "client_ed25519")
    with contextlib.ExitStack() as stack:
        # The VM's home sits outside pytest's basetemp, which only its owner may enter.
        home = Path(tempfile.mkdtemp(prefix="tcvm-home-", dir="/tmp"))
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        home.chmod(0o755)
        entry, remote_dir, note = _login_user(stack, home)
        hf_home = home / ".cache" / "huggingface"
        for folder in (home / "inbox", hf_home, home / ".ssh"):
            folder.mkdir(parents=True)
        # sshd reads authorized_keys as the login user, so it lives in that user's home.
        auth = home / ".ssh" / "authorized_keys"
        auth.write_text((base / "client_ed25519.pub").read_text())
        auth.chmod(0o600)
        sshd = Sshd(
            port=free_port(),
            user=entry.pw_name,
            home=home,
            client_key=base / "client_ed25519",
            host_public_key=host_pub,
            remote_dir=remote_dir,
            note=note,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
        )
        sshd.own(home)
        proc = _start_sshd(base, sshd, auth, hf_home)
        stack.callback(_stop_sshd, proc)
        _wait_port(sshd.port, proc)
        yield sshd
        _stop_vm_processes(sshd.work)


def _start_sshd(base: Path, sshd: Sshd, auth: Path, hf_home: Path) -> subprocess.Popen:
    config = base / "sshd_config"
    config.write_text(
        f"Port {sshd.port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_ed25519'}\n"
        f"PidFile {base / 'sshd.pid'}\nAuthorizedKeysFile {auth}\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"PermitRootLogin prohibit-password\nAllowUsers {sshd.user}\n"
        "Subsystem sftp internal-sftp\nMaxSessions 64\nMaxStartups 64\nLogLevel ERROR\n"
        # The stand-in VM has no network either: keep the jobs' libraries offline.
        f"SetEnv HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME={hf_home} "
        "TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    return subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)


def _stop_sshd(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


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
    # The marker and the fake uv are on the "VM": the login user reads and runs them.
    marker = sshd.inbox / "ready"
    marker.write_text("ready\n")
    return {
        "TINYCLOUD_UV": str(fake_uv(sshd.inbox)),
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
