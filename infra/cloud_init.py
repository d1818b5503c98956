"""The VM's first-boot script (cloud-init user data), rendered from ``infra/vm/``.

    python -m infra.cloud_init > user-data.yaml     # render with a throwaway host key
    cloud-init schema --config-file user-data.yaml  # what the tests run, too

Every value enters the YAML JSON-encoded (JSON is YAML, so any string is safe there) and the
one file of shell values is written with ``shlex.quote``; the scripts themselves are static
files in ``infra/vm/`` that shellcheck reads as they are, shipped gzipped (``gz+b64``). No
Pulumi import here: `remote/` and the tests use these paths and this renderer without an engine.
"""

from __future__ import annotations

import base64
import gzip
import json
import shlex
from pathlib import Path

import jinja2

from facts import (
    API_PORT,
    MAX_RUN_HOURS_ENV,
    RUNS_ENV,
    SSH_USER,
    VM_RUNS_DIR,
    VM_SETTINGS,
    VM_STATE_DIR,
)

VM_DIR = Path(__file__).resolve().parent / "vm"

# The VM's user, directories and markers that `fab` relies on are in facts.py.
IDLE_ENV = VM_SETTINGS  # the stack's settings, shell-sourced by the VM's scripts
USER_DATA_LIMIT = 16 * 1024  # bytes: EC2 refuses larger user data

# Files written verbatim onto the VM: (source in infra/vm/, destination, mode).
STATIC_FILES = (
    ("tinycloud-bootstrap.sh", "/usr/local/sbin/tinycloud-bootstrap", "0755"),
    ("tinycloud-idle.sh", "/usr/local/sbin/tinycloud-idle", "0755"),
    ("tinycloud-activity.service", "/etc/systemd/system/tinycloud-activity.service", "0644"),
    ("tinycloud-idle.service", "/etc/systemd/system/tinycloud-idle.service", "0644"),
    ("tinycloud-idle.timer", "/etc/systemd/system/tinycloud-idle.timer", "0644"),
    ("tinycloud-cap.sh", "/usr/local/sbin/tinycloud-cap", "0755"),
    ("tinycloud-cap.service", "/etc/systemd/system/tinycloud-cap.service", "0644"),
    ("tinycloud-cap.timer", "/etc/systemd/system/tinycloud-cap.timer", "0644"),
)
SHELL_SCRIPTS = tuple(VM_DIR / src for src, _, _ in STATIC_FILES if src.endswith(".sh"))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(  # noqa: S701 (YAML, not HTML: values go through the json filter)
        loader=jinja2.FileSystemLoader(VM_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=True)
    return env


def idle_env(*, api_port: int, idle_stop_minutes: int, gpu: bool, max_run_hours: int = 0) -> str:
    """The shell-sourced settings file the VM's scripts share (values shell-quoted)."""
    values = {
        "TINYCLOUD_USER": SSH_USER,
        RUNS_ENV: VM_RUNS_DIR,
        "TINYCLOUD_STATE": VM_STATE_DIR,
        "TINYCLOUD_API_PORT": str(int(api_port)),
        "TINYCLOUD_IDLE_MINUTES": str(int(idle_stop_minutes)),
        "TINYCLOUD_GPU": "1" if gpu else "0",
        MAX_RUN_HOURS_ENV: str(int(max_run_hours)),
    }
    lines = [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    return "# Written by cloud-init from the Pulumi stack config.\n" + "\n".join(lines) + "\n"


def packed(src: str) -> str:
    """A static file gzipped and base64-encoded for ``write_files`` (``encoding: gz+b64``):
    the scripts take a third of the room, well inside EC2's 16 KB. No timestamp in the gzip
    header, so the same file always renders the same user data."""
    raw = (VM_DIR / src).read_bytes()
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode()


def unpacked(entry: dict) -> str:
    """A ``write_files`` entry's text as it lands on the VM (what the tests compare)."""
    if entry.get("encoding") == "gz+b64":
        return gzip.decompress(base64.b64decode(entry["content"])).decode()
    return entry["content"]


def render_user_data(
    *,
    host_private_key: str,
    host_public_key: str,
    api_port: int,
    idle_stop_minutes: int,
    gpu: bool,
    max_run_hours: int = 0,
) -> str:
    """The ``#cloud-config`` document the instance boots with."""
    if not host_private_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----"):
        raise ValueError("host_private_key must be an OpenSSH private key (PEM)")
    if not host_public_key.startswith("ssh-ed25519 "):
        raise ValueError("host_public_key must be an 'ssh-ed25519 AAAA...' line")
    files = [
        {"path": dest, "permissions": mode, "encoding": "gz+b64", "content": packed(src)}
        for src, dest, mode in STATIC_FILES
    ]
    files.insert(
        0,
        {
            "path": IDLE_ENV,
            "permissions": "0644",
            "encoding": "",  # plain text: the settings stay readable in the user data
            "content": idle_env(
                api_port=api_port,
                idle_stop_minutes=idle_stop_minutes,
                gpu=gpu,
                max_run_hours=max_run_hours,
            ),
        },
    )
    document = (
        _environment()
        .get_template("cloud-config.yaml.j2")
        .render(
            host_private_key=host_private_key.strip() + "\n",
            host_public_key=host_public_key.strip(),
            files=files,
        )
    )
    size = len(document.encode())
    if size > USER_DATA_LIMIT:
        raise ValueError(f"user data is {size} bytes; EC2 allows {USER_DATA_LIMIT}")
    return document


def new_ed25519_keypair() -> tuple[str, str]:
    """(OpenSSH private PEM, public line): for previews here, and for the tests' mocks."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode()


if __name__ == "__main__":
    private, public = new_ed25519_keypair()
    print(
        render_user_data(
            host_private_key=private,
            host_public_key=public,
            api_port=API_PORT,
            idle_stop_minutes=60,
            gpu=False,
            max_run_hours=12,
        ),
        end="",
    )
