"""Where the control side keeps things here, and the environment variables that move them.

Every local path the `fab` tasks agree on lives here (the facts the VM shares too are in
``facts.py``), so a test, or an operator with an unusual layout, can point them elsewhere with
one variable:

| variable                | default                  | what it sets                          |
|-------------------------|--------------------------|---------------------------------------|
| TINYCLOUD_TARGET        | remote                   | `local`: this machine, no SSH         |
| TINYCLOUD_STACK         | the selected stack       | whose outputs name the host           |
| TINYCLOUD_STACK_OUTPUTS | (run the Pulumi CLI)     | a recorded `pulumi stack output`      |
| TINYCLOUD_HOST/USER/KEY | (from the stack)         | an explicit host instead of a stack   |
| TINYCLOUD_SSH_PORT      | 22                       | the host's SSH port                   |
| TINYCLOUD_KNOWN_HOSTS   | ~/.ssh/known_hosts       | host keys for an explicit --host      |
| TINYCLOUD_REMOTE_DIR    | ~/tinycloud on the host  | the work directory on the host        |
| TINYCLOUD_READY_MARKER  | /var/lib/tinycloud/ready | the file cloud-init writes when done  |
| TINYCLOUD_PYTHON        | (built by `fab setup`)   | use this interpreter on the host      |
| TINYCLOUD_UV            | uv on the host's PATH    | the uv binary `fab setup` builds with |
| TINYCLOUD_WAITER_DELAY  | 5                        | seconds between boto3 waiter polls    |
| TINYCLOUD_HOME          | ./.tinycloud             | local state: keys, pinned host keys   |
| TINYCLOUD_LOCAL_RUNS    | ./runs                   | where `fab fetch` puts runs           |
| TINYCLOUD_RENDERED      | ./rendered               | where prompt.sh and chat.html go      |
| TINYCLOUD_CURRENT_IP    | (checkip.amazonaws.com)  | this machine's public IP              |
| TINYCLOUD_VM_SETTINGS   | /etc/tinycloud/idle.env  | the VM's settings (the run-time cap)  |
| TINYCLOUD_BOOT_LOG      | /var/lib/tinycloud/boots.log | the VM's boot log (its time) |
"""

from __future__ import annotations

import os
from pathlib import Path

from facts import ENV_PREFIX, RUNS_DIR_NAME

ROOT = Path(__file__).resolve().parent.parent  # the repository: fab runs from here


def env(name: str, default: str = "") -> str:
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


def state_home() -> Path:
    """Local state: one folder per stack with its private key, pinned host key and API key."""
    return Path(env("HOME") or ROOT / ".tinycloud")


def local_runs_dir() -> Path:
    return Path(env("LOCAL_RUNS") or ROOT / RUNS_DIR_NAME)


def rendered_dir() -> Path:
    return Path(env("RENDERED") or ROOT / "rendered")
