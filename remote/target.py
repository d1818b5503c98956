"""Which machine a `fab` task talks to, and how to log in to it safely.

Three ways, tried in this order:

    fab status --target local                      # this machine, no SSH
    fab status --host ubuntu@203.0.113.7 --key ~/.ssh/id_ed25519
    fab status [--stack dev]                       # `pulumi stack output --json --show-secrets`

From a stack, the private key is written to ``.tinycloud/<stack>/id_ed25519`` (mode 0600) and the
host key the stack generated (``host_public_key``) is pinned in ``.tinycloud/<stack>/known_hosts``:
the first connection is as trusted as every later one, with no "accept this fingerprint?" step.
``TINYCLOUD_STACK_OUTPUTS=FILE`` reads a recorded ``pulumi stack output --json`` document instead
of running the Pulumi CLI (the tests do this).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from invoke import Exit

from facts import API_PORT, SSH_PORT, SSH_USER, Output
from remote import paths

NO_STACK = (
    "no Pulumi stack outputs to find the host in{why}. Run `pulumi up` first, or pass --host."
)
REQUIRED_OUTPUTS = (Output.SSH_USER, Output.PRIVATE_KEY, Output.HOST_PUBLIC_KEY)
_HOST_RE = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[0-9a-fA-F:]+\]|[^:\s]+)(?::(?P<port>\d+))?$"
)


@dataclass(frozen=True)
class Target:
    """Everything needed to reach one machine; ``local`` means this one."""

    name: str  # the stack, the host, or "local": names the folder under .tinycloud/
    local: bool = False
    host: str = ""
    port: int = SSH_PORT
    user: str = ""
    key_file: Path | None = None
    known_hosts: Path | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    from_stack: bool = False

    @property
    def state_dir(self) -> Path:
        return paths.state_home() / _safe_name(self.name)

    @property
    def instance_id(self) -> str:
        return str(self.outputs.get(Output.INSTANCE_ID) or "")

    @property
    def region(self) -> str:
        return str(self.outputs.get(Output.REGION) or "")

    @property
    def allowed_cidrs(self) -> list[str]:
        return [str(c) for c in self.outputs.get(Output.ALLOWED_CIDRS) or []]

    @property
    def api_port(self) -> int:
        return int(self.outputs.get(Output.API_PORT) or API_PORT)

    @property
    def api_url(self) -> str:
        """The inference API as the operator's browser reaches it."""
        if self.outputs.get(Output.API_URL):
            return str(self.outputs[Output.API_URL]).rstrip("/")
        host = "127.0.0.1" if self.local else self.outputs.get(Output.PUBLIC_DNS) or self.host
        return f"http://{host}:{self.api_port}"

    def ssh_argv(self, *extra: str) -> list[str]:
        """An OpenSSH command line with the same key and pinned host key Fabric uses."""
        argv = ["ssh"]
        if self.key_file:
            argv += ["-i", str(self.key_file), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        argv += ["-o", "StrictHostKeyChecking=yes", "-p", str(self.port)]
        return [*argv, *extra, f"{self.user}@{self.host}"]


def resolve(
    target: str = "", stack: str = "", host: str = "", user: str = "", key: str = ""
) -> Target:
    """The machine the task flags (or, failing those, the environment) point at."""
    kind = (target or paths.env("TARGET") or "remote").lower()
    if kind not in ("remote", "local"):
        raise Exit(f"--target {kind!r} is not known: use `remote` (the default) or `local`.")
    if kind == "local":
        return Target(name="local", local=True)
    host = host or paths.env("HOST")
    if host:
        return explicit_target(host, user or paths.env("USER"), key or paths.env("KEY"))
    return stack_target(stack or paths.env("STACK"))


def explicit_target(spec: str, user: str = "", key: str = "") -> Target:
    """``[user@]host[:port]`` with a key file; host keys come from a known_hosts file."""
    m = _HOST_RE.match(spec.strip())
    if not m:
        raise Exit(f"--host {spec!r} is not [user@]host[:port].")
    host = m["host"].strip("[]")
    port = int(m["port"] or paths.env("SSH_PORT") or SSH_PORT)
    key_file = Path(key).expanduser() if key else None
    if key_file and not key_file.is_file():
        raise Exit(f"--key {key}: no such file. Point it at the private key for {host}.")
    known = Path(paths.env("KNOWN_HOSTS") or Path.home() / ".ssh" / "known_hosts")
    return Target(
        name=host,
        host=host,
        port=port,
        user=user or m["user"] or SSH_USER,
        key_file=key_file,
        known_hosts=known.expanduser(),
    )


def stack_target(stack: str = "") -> Target:
    """The host a Pulumi stack created, with its key written and its host key pinned."""
    outputs, name = read_stack_outputs(stack)
    missing = [k for k in REQUIRED_OUTPUTS if not outputs.get(k)]
    host = str(outputs.get(Output.PUBLIC_DNS) or outputs.get(Output.PUBLIC_IP) or "")
    if missing or not host:
        lacking = ", ".join(missing + ([] if host else ["public_dns/public_ip"]))
        raise Exit(
            f"stack {name!r} has no {lacking} output. Run `pulumi up` to bring it up to date, "
            "or pass --host."
        )
    port = int(paths.env("SSH_PORT") or SSH_PORT)
    t = Target(
        name=name,
        host=host,
        port=port,
        user=str(outputs[Output.SSH_USER]),
        outputs=outputs,
        from_stack=True,
    )
    names = [n for n in (outputs.get(Output.PUBLIC_DNS), outputs.get(Output.PUBLIC_IP)) if n]
    key_file = write_secret(t.state_dir / "id_ed25519", str(outputs[Output.PRIVATE_KEY]))
    host_key = str(outputs[Output.HOST_PUBLIC_KEY])
    known = pin_host_key(t.state_dir / "known_hosts", names, port, host_key)
    return replace(t, key_file=key_file, known_hosts=known)


def read_stack_outputs(stack: str = "") -> tuple[dict[str, Any], str]:
    """(outputs, stack name) from a recorded document or the Pulumi CLI."""
    recorded = paths.env("STACK_OUTPUTS")
    if recorded:
        path = Path(recorded)
        if not path.is_file():
            raise Exit(NO_STACK.format(why=f" (TINYCLOUD_STACK_OUTPUTS={recorded} is missing)"))
        text, name = path.read_text(), stack or path.stem
    else:
        text = _pulumi(["stack", "output", "--json", "--show-secrets", *_stack_flag(stack)])
        name = stack or _pulumi(["stack", "--show-name"]).strip() or "default"
    try:
        outputs = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise Exit(NO_STACK.format(why=f" (the outputs are not JSON: {err})")) from None
    if not isinstance(outputs, dict) or not outputs:
        raise Exit(NO_STACK.format(why=f" (stack {name!r} has no outputs)"))
    return outputs, name


def _stack_flag(stack: str) -> list[str]:
    return ["--stack", stack] if stack else []


def _pulumi(args: list[str]) -> str:
    try:
        proc = subprocess.run(
            ["pulumi", *args], cwd=paths.ROOT, capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise Exit(NO_STACK.format(why=" (the Pulumi CLI is not installed)")) from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pulumi failed"])[-1]
        raise Exit(NO_STACK.format(why=f" ({last.removeprefix('error: ')})"))
    return proc.stdout


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` so that only this user can ever read it: the file is 0600 from birth."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")  # OpenSSH wants the newline
    os.replace(tmp, path)
    return path


def stack_secret(target: Target, name: str, nbytes: int) -> str:
    """A secret of this stack's (the API key, the notebook token), kept in its state dir
    (0600) and made on first use."""
    path = target.state_dir / name
    if path.is_file() and (value := path.read_text().strip()):
        return value
    value = secrets.token_urlsafe(nbytes)
    write_secret(path, value)
    return value


def pin_host_key(path: Path, names: list[str], port: int, public_key: str) -> Path:
    """A known_hosts file holding exactly the host key the stack generated, for each name."""
    fields = public_key.split()
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-")):
        raise Exit(f"host_public_key {public_key[:30]!r}... is not an OpenSSH public key line.")
    try:
        base64.b64decode(fields[1], validate=True)
    except binascii.Error:
        raise Exit("host_public_key is not valid base64; run `pulumi up` to refresh it.") from None
    hosts = [n if port == SSH_PORT else f"[{n}]:{port}" for n in names]
    lines = "".join(f"{h} {fields[0]} {fields[1]}\n" for h in hosts)
    return write_secret(path, lines)


def in_cidrs(ip: str, cidrs: list[str]) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in ipaddress.ip_network(c, strict=False) for c in cidrs)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "default"
