"""Where the control side keeps things, and the environment variables that move them.

Every path and default the `fab` tasks agree on lives here, so a test (or an operator with an
unusual layout) can point them elsewhere with one variable:

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
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.constants import API_KEY_ENV, DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent  # the repository: fab runs from here

DEFAULT_USER = "ubuntu"  # Ubuntu AMIs and the Deep Learning AMI log in as ubuntu
DEFAULT_SSH_PORT = 22
DEFAULT_REMOTE_DIR = "tinycloud"  # relative to the remote user's home
API_PORT = DEFAULT_PORT  # the inference API port, one number for both engines
SERVER_API_KEY_ENV = API_KEY_ENV

# What `fab setup` ships: the job code, the serving code, and the empty package marker that
# makes `python -m remote.jobs.pretrain` importable without bringing the control side along.
SYNC_DIRS = ("remote/jobs", "serving")
SYNC_FILES = ("remote/__init__.py",)
SYNC_EXCLUDES = ("__pycache__", "*.pyc", ".pytest_cache")

# Files inside the remote work directory.
PYTHON_FILE = ".python"  # the interpreter `fab setup` chose, one line
REQUIREMENTS_FILE = "requirements.txt"  # the pins `fab setup` installed (from uv.lock)
TRACK_FILE = ".track"  # the tracker groups `fab setup --track` added, one a line
ENV_STAMP = ".venv/.tinycloud-stamp"  # digest of what the environment was built from
RUNS_DIR = "runs"
SERVE_DIR = "serve"  # the server's env file, pid, log, rendered launch script

SERVICE_NAME = "tinycloud-serve"  # the systemd unit of the native engine
CONNECT_TIMEOUT_S = 10


def env(name: str, default: str = "") -> str:
    return os.environ.get(f"TINYCLOUD_{name}", default)


def state_home() -> Path:
    """Local state: one folder per stack with its private key, pinned host key and API key."""
    return Path(env("HOME") or ROOT / ".tinycloud")


def local_runs_dir() -> Path:
    return Path(env("LOCAL_RUNS") or ROOT / "runs")


def rendered_dir() -> Path:
    return Path(env("RENDERED") or ROOT / "rendered")
