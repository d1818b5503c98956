"""The booted stand-in VM as a pytest fixture, and `fab` aimed at it as a user's stack would be.

    from vm_harness import booted_vm_fixture, fab_fixture  # noqa: F401 (pytest fixtures)

``booted_vm`` (session): the cached image (vm_image.py) copied, seeded and booted (vm_machine.py)
with the user data `pulumi up` would give it: ``infra.cloud_init.render_user_data`` with a fresh
ed25519 host key pair and the stack's defaults (port 8080, 60 idle minutes, a 12-hour run cap).
Its login key is a fresh ed25519 pair too, in ``meta-data`` as EC2 hands it to cloud-init.
``BootedVm.env`` is what `fab` needs: a stack-outputs document like `pulumi stack output --json
--show-secrets` writes, naming the VM's address and the rendered host key, plus local state
folders.

Needs root, ``mmdebstrap``, ``systemd-nspawn`` (systemd-container), ``ip``, ``nft`` and the
registries (Debian's archive, PyPI); a machine without them skips, CI (which installs them)
fails instead. The first run on a machine builds the image (about a minute).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import vm_image
import vm_machine
from conftest import LOCAL_TEST_NETWORKS, ROOT

from facts import API_PORT, SSH_USER, Output
from infra import cloud_init
from infra.config import DEFAULTS
from tests.remote.remote_harness import run_fab

SESSIONS = Path(os.environ.get("TINYCLOUD_VM_SESSIONS", "/var/tmp/tinycloud-vm"))
# The stack's defaults, as `pulumi up` with no config renders them.
IDLE_MINUTES = DEFAULTS["idleStopMinutes"]
MAX_RUN_HOURS = DEFAULTS["maxRunHours"]
STACK = "vmboot"  # the stack's name, from its outputs file: .tinycloud/vmboot/, rendered/vmboot/


@dataclass
class BootedVm:
    machine: vm_machine.Machine
    env: dict[str, str]  # `fab`'s environment: the stack outputs and local state
    host_public_key: str  # what the user data installs as the VM's only host key
    login_public_key: str
    outputs_path: Path

    @property
    def ip(self) -> str:
        return self.machine.network.vm_ip

    @property
    def api_url(self) -> str:
        return f"http://{self.ip}:{API_PORT}"

    def root(self, script: str, **kw) -> subprocess.CompletedProcess:
        """A shell line as root on the VM (through its namespaces, not SSH)."""
        return self.machine.sh(script, **kw)

    def wait_for_cloud_init(self, timeout: float = 900) -> str:
        done = self.root("cloud-init status --wait --long", check=False, timeout=timeout)
        return done.stdout

    def home(self) -> Path:
        """/home/ubuntu on the VM's disk, seen from here."""
        return self.machine.root / "home" / SSH_USER

    def upload(self, src: Path, dest: str) -> str:
        """Put ``src`` at ``dest`` (under /home/ubuntu) as the VM's user owns it: an upload."""
        target = self.home() / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
        self.root(f"chown -R {SSH_USER}: /home/{SSH_USER}/{dest.split('/')[0]}")
        return f"/home/{SSH_USER}/{dest}"

    def boot(self) -> None:
        self.machine.boot()


def _why_not() -> str:
    if os.geteuid() != 0:
        return "booting the stand-in VM needs root (systemd-nspawn, network namespaces)"
    tools = ("nsenter", "unshare", "losetup", "mkfs.ext4")
    missing = vm_image.missing_tools() + [t for t in tools if not shutil.which(t)]
    if missing:
        return (
            f"{', '.join(missing)} not installed: apt-get install mmdebstrap systemd-container "
            "iproute2 nftables util-linux mount e2fsprogs"
        )
    return ""


def new_login_keypair() -> tuple[str, str]:
    """The stack's login key: ed25519, as tls.PrivateKey makes it for the key pair."""
    return cloud_init.new_ed25519_keypair()


def write_outputs(path: Path, vm: vm_machine.Machine, private_key: str, host_public: str) -> Path:
    """A `pulumi stack output --json --show-secrets` document for this VM (no AWS instance:
    nothing for boto3 to wait on, so `fab setup` goes straight to SSH)."""
    recorded = json.loads((ROOT / "tests/remote/data/stack-outputs.json").read_text())
    net = vm.network
    outputs = {
        **recorded,
        Output.INSTANCE_ID: "",
        Output.PUBLIC_DNS: net.vm_ip,
        Output.PUBLIC_IP: net.vm_ip,
        Output.API_PORT: API_PORT,
        Output.API_URL: f"http://{net.vm_ip}:{API_PORT}",
        Output.PRIVATE_KEY: private_key,
        Output.HOST_PUBLIC_KEY: host_public,
        Output.ALLOWED_CIDRS: [f"{net.host_ip}/32"],
        Output.SSH_USER: SSH_USER,
    }
    path.write_text(json.dumps(outputs, indent=2))
    return path


@pytest.fixture(name="fab")
def fab_fixture(capsys):
    """The real `fab` CLI in this process (remote_harness.run_fab), env applied per call."""
    return lambda env, *args: run_fab(capsys, env, *args)


@pytest.fixture(scope="session", name="booted_vm")
def booted_vm_fixture(tmp_path_factory):
    why = _why_not()
    if why:
        pytest.skip(why)
    base = vm_image.cached_image()
    SESSIONS.mkdir(parents=True, exist_ok=True)
    vm = vm_machine.create(f"tcvm-{uuid.uuid4().hex[:6]}", base, SESSIONS)
    network = ipaddress.ip_network(vm.network.cidr)
    LOCAL_TEST_NETWORKS.append(network)
    try:
        host_private, host_public = cloud_init.new_ed25519_keypair()
        login_private, login_public = new_login_keypair()
        user_data = cloud_init.render_user_data(
            host_private_key=host_private,
            host_public_key=host_public,
            api_port=API_PORT,
            idle_stop_minutes=IDLE_MINUTES,
            gpu=False,
            max_run_hours=MAX_RUN_HOURS,
        )
        vm.seed(user_data, meta_data(vm, login_public))
        state = tmp_path_factory.mktemp("vm-fab")
        outputs = write_outputs(state / f"{STACK}.json", vm, login_private, host_public)
        env = {
            "TINYCLOUD_STACK_OUTPUTS": str(outputs),
            "TINYCLOUD_HOME": str(state / "home"),
            "TINYCLOUD_LOCAL_RUNS": str(state / "runs"),
            "TINYCLOUD_RENDERED": str(state / "rendered"),
            "TINYCLOUD_CURRENT_IP": vm.network.host_ip,
        }
        booted = BootedVm(vm, env, host_public.strip(), login_public.strip(), outputs)
        booted.boot()
        yield booted
    finally:
        with contextlib.suppress(ValueError):
            LOCAL_TEST_NETWORKS.remove(network)
        vm_machine.destroy(vm)


def meta_data(vm: vm_machine.Machine, login_public: str) -> dict:
    """NoCloud meta-data shaped as EC2's: the instance id, the host name, and the key pair's
    public key under its name (what cloud-init's Ec2 datasource reads from the metadata)."""
    return {
        "instance-id": f"i-{uuid.uuid4().hex[:17]}",
        "local-hostname": "ip-" + vm.network.vm_ip.replace(".", "-"),
        "public-keys": {"tinycloud-key": [login_public.strip()]},
    }
