"""Run shell commands and move files on the target: over SSH (Fabric) or on this machine.

Both runners speak the same small language, so every task is written once:

    runner = connect(resolve(target="local"))
    runner.sh("ls runs")                 # a shell line, run inside the work directory
    runner.put_bytes(b"...", "serve/serve.env", mode=0o600)
    runner.get("runs/x/model/config.json", Path("runs/x/model/config.json"))

The SSH runner trusts only the pinned host key (paramiko's RejectPolicy, never "add on first
use") and turns a failed connection into an explanation (see ``diagnose``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from invoke import Context, Exit, Result

from facts import REMOTE_DIR_NAME
from remote import paths
from remote.target import Target

q = shlex.quote
PYTHON_FILE = ".python"  # in the work directory: the interpreter `fab setup` chose, one line
CONNECT_TIMEOUT_S = 10


class Runner:
    """The target's work directory (``base``) plus a way to run commands and copy files."""

    base: str
    local: bool = False

    def run(
        self,
        cmd: str,
        *,
        hide: bool = True,
        warn: bool = False,
        timeout: int | None = None,
        **kw: Any,
    ) -> Result:
        raise NotImplementedError

    def sh(
        self, script: str, *, warn: bool = False, hide: bool = True, timeout: int | None = None
    ) -> Result:
        """Run ``script`` with the work directory as the current directory.

        ``script`` is its own list after the ``cd`` (``;``, not ``&&``), so a trailing ``&`` in
        it backgrounds one command, never the ``cd`` as well.
        """
        return self.run(
            f"cd {q(self.base)} || exit 1; {script}", warn=warn, hide=hide, timeout=timeout
        )

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def read_text(self, rel: str) -> str | None:
        """A small file's text, or None when it is not there."""
        r = self.sh(f"cat {q(rel)} 2>/dev/null", warn=True)
        return r.stdout if r.ok else None

    def has_command(self, name: str) -> bool:
        return self.run(f"command -v {q(name)} >/dev/null 2>&1", warn=True).ok

    def put_bytes(self, data: bytes, rel: str, mode: int = 0o644) -> None:
        raise NotImplementedError

    def get(self, rel: str, local: Path) -> None:
        raise NotImplementedError

    def python(self) -> str:
        """The interpreter `fab setup` chose for the jobs."""
        text = self.read_text(PYTHON_FILE)
        if not text or not text.strip():
            raise Exit("the host has no job environment yet. Run `fab setup` first.")
        return text.strip()

    def close(self) -> None:
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalRunner(Runner):
    """This machine: the work directory is ``.tinycloud/local/work`` and the jobs import the
    repository's own code (PYTHONPATH), so there is nothing to sync."""

    local = True

    def __init__(self, base: Path):
        base.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # holds the API key
        base.mkdir(exist_ok=True)
        self.base = str(base.resolve())
        self._ctx = Context()
        self._env = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(paths.ROOT), os.environ.get("PYTHONPATH")])
            )
        }

    def run(
        self,
        cmd: str,
        *,
        hide: bool = True,
        warn: bool = False,
        timeout: int | None = None,
        **kw: Any,
    ) -> Result:
        return self._ctx.run(
            cmd, hide=hide, warn=warn, timeout=timeout, env=self._env, in_stream=False, **kw
        )

    def python(self) -> str:
        text = self.read_text(PYTHON_FILE)
        return text.strip() if text and text.strip() else sys.executable

    def put_bytes(self, data: bytes, rel: str, mode: int = 0o644) -> None:
        dest = Path(self.path(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)

    def get(self, rel: str, local: Path) -> None:
        shutil.copyfile(self.path(rel), local)


class SshRunner(Runner):
    """A Fabric connection; commands run in the remote user's shell."""

    def __init__(self, conn: Any, target: Target):
        self.conn = conn
        self.target = target
        override = paths.env("REMOTE_DIR")
        if override.startswith("/"):
            self.base = override.rstrip("/")
        else:
            home = conn.run('printf %s "$HOME"', hide=True, in_stream=False).stdout.strip()
            self.base = f"{home}/{override or REMOTE_DIR_NAME}"
        self._sftp: Any = None

    def run(
        self,
        cmd: str,
        *,
        hide: bool = True,
        warn: bool = False,
        timeout: int | None = None,
        **kw: Any,
    ) -> Result:
        return self.conn.run(cmd, hide=hide, warn=warn, timeout=timeout, in_stream=False, **kw)

    @property
    def sftp(self) -> Any:
        if self._sftp is None:
            self._sftp = self.conn.sftp()
        return self._sftp

    def put_bytes(self, data: bytes, rel: str, mode: int = 0o644) -> None:
        # Set the mode before the bytes arrive, then rename: a secret is never world-readable.
        dest = self.path(rel)
        tmp = f"{dest}.tmp"
        self.run(f"mkdir -p {q(os.path.dirname(dest))}")
        with self.sftp.open(tmp, "wb") as f:
            self.sftp.chmod(tmp, mode)
            f.write(data)
        self.sftp.posix_rename(tmp, dest)

    def get(self, rel: str, local: Path) -> None:
        self.sftp.get(self.path(rel), str(local))

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.conn.close()


# Waits before trying again when sshd took the connection and dropped it: a booting host does
# that while cloud-init writes its host keys and restarts sshd (the port is open, then closed
# for a moment, then open again). Once a connection was dropped, a refused one is that restart
# too; otherwise a refusal, a timeout or a wrong key is explained at once.
RESET_RETRY_DELAYS_S = (2.0, 4.0, 8.0, 16.0)


def connect(target: Target) -> Runner:
    """A runner for ``target``; for SSH, a clear `Exit` when the host cannot be reached."""
    import time

    if target.local:
        return LocalRunner(target.state_dir / "work")
    dropped = False
    for delay in (*RESET_RETRY_DELAYS_S, None):
        conn = _connection(target)
        try:
            conn.open()
            return SshRunner(conn, target)
        except Exception as err:  # paramiko and the socket layer raise many kinds; all explained
            this_dropped = _dropped(err)
            restarting = this_dropped or (dropped and _refused(err))
            dropped = dropped or this_dropped
            if delay is None or not restarting:
                from remote.diagnose import explain_connect_error

                raise Exit(explain_connect_error(target, err)) from None
            conn.close()
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _refused(err: BaseException) -> bool:
    from remote.diagnose import _reason

    return _reason(err) == "connection refused"


def _dropped(err: BaseException) -> bool:
    """Whether sshd accepted the connection and then dropped it (reset, or closed before its
    banner): what a host restarting its sshd looks like."""
    import paramiko

    if isinstance(err, ConnectionResetError | EOFError):
        return True
    text = str(err).lower()
    return isinstance(err, paramiko.SSHException) and (
        "connection reset" in text or "error reading ssh protocol banner" in text
    )


def _connection(target: Target) -> Any:
    from fabric import Config, Connection
    from paramiko import RejectPolicy

    kwargs: dict[str, Any] = {"banner_timeout": 20, "auth_timeout": 20}
    if target.key_file:
        kwargs.update(key_filename=str(target.key_file), look_for_keys=False, allow_agent=False)
    config = Config(lazy=True)  # no ~/.ssh/config surprises: the stack says how to connect
    conn = Connection(
        target.host,
        user=target.user,
        port=target.port,
        config=config,
        connect_timeout=CONNECT_TIMEOUT_S,
        connect_kwargs=kwargs,
    )
    if target.known_hosts and target.known_hosts.is_file():
        conn.client.load_host_keys(str(target.known_hosts))
    conn.client.set_missing_host_key_policy(RejectPolicy())
    return conn
