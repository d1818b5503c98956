"""The stack's settings: read once from `pulumi config`, typed, checked, with fixes in the errors.

    pulumi config set tinycloud:gpu true
    pulumi config set --path 'tinycloud:allowedCidrs[0]' 203.0.113.7/32
    pulumi config                      # lists what is set; Pulumi.yaml describes every key

Every key lives in the ``tinycloud:`` namespace. ``Pulumi.yaml`` declares the same keys with the
same defaults (a test keeps the two in step). A wrong value stops `pulumi up` before anything is
created, with a message that names the key and the command that fixes it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pulumi

from facts import API_PORT
from infra.training_host import is_world

NAMESPACE = "tinycloud"

# The defaults, one per line. Pulumi.yaml repeats them for `pulumi config` and the docs.
DEFAULTS: dict[str, Any] = {
    "instanceType": "",  # "" = m5.large, or g4dn.xlarge when gpu is true
    "gpu": False,  # true: an NVIDIA GPU type and the Deep Learning AMI
    "amiId": "",  # "" = the newest Ubuntu 24.04 (or Deep Learning) AMI, looked up
    "volumeSizeGb": 100,  # gp3 root volume, GB: runs, checkpoints, Docker images
    "deleteVolumeOnDestroy": False,  # false: the volume and its runs outlive `pulumi destroy`
    "allowedCidrs": [],  # who may reach SSH and the API; [] = your public IP /32, looked up
    "openToTheWorld": False,  # true: allow 0.0.0.0/0 and ::/0, i.e. anyone on the internet
    "apiPort": API_PORT,  # the inference API (TGI or the native server), 1024-65535
    "idleStopMinutes": 60,  # stop the VM after this long with no job/API/SSH; 0 = never
    "maxRunHours": 12,  # stop the VM this long after its start, even mid-job; 0 = no cap
    "sshPublicKey": "",  # your own OpenSSH public key; "" = a key pair generated for you
}

CPU_INSTANCE_TYPE = "m5.large"
GPU_INSTANCE_TYPE = "g4dn.xlarge"
# NVIDIA families the Deep Learning AMI's open-source driver supports (Turing and newer).
GPU_FAMILIES = frozenset(
    {"g4dn", "g5", "g6", "g6e", "gr6", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200"}
)
# GPU families the default image cannot drive, with the reason users need to hear.
UNSUPPORTED_GPU_FAMILIES = {
    "p2": "K80 GPUs are not supported by current NVIDIA drivers",
    "p3": "V100 GPUs are not supported by the open-source NVIDIA driver in the Deep Learning AMI",
    "p3dn": "V100 GPUs are not supported by the open-source NVIDIA driver in the Deep Learning AMI",
    "g3": "M60 GPUs are not supported by current NVIDIA drivers",
    "g4ad": "its GPUs are AMD Radeon, not NVIDIA",
    "g5g": "it is an arm64 (Graviton) type and the images are amd64",
}
MIN_VOLUME_GB = 20  # the image takes ~3 GB, Docker + PyTorch + a TGI image take ~15 more
MAX_VOLUME_GB = 16384  # gp3's limit
MIN_IDLE_MINUTES = 5  # shorter would stop the VM between two `fab` commands
MAX_RUN_HOURS = 720  # 30 days: a cap above that protects no student's budget

_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_GRAVITON_FAMILY = re.compile(r"^[a-z]+\d+[a-z-]*g")  # m7g, t4g, c6gn, x2gd, g5g, ...
_SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")  # what EC2 ImportKeyPair accepts


class ConfigError(pulumi.RunError, ValueError):
    """A setting is wrong. `pulumi up` prints the message alone, without a traceback."""


class ConfigSource(Protocol):
    """What ``load`` needs of ``pulumi.Config``: the raw string of a key, or ``None``."""

    def get(self, key: str) -> str | None: ...


@dataclass(frozen=True)
class Settings:
    instance_type: str
    gpu: bool
    ami_id: str | None  # None: look it up
    volume_size_gb: int
    delete_volume_on_destroy: bool
    allowed_cidrs: tuple[str, ...]
    open_to_the_world: bool
    api_port: int
    idle_stop_minutes: int
    max_run_hours: int  # 0: no cap
    ssh_public_key: str | None  # None: generate a key pair


def key(name: str) -> str:
    return f"{NAMESPACE}:{name}"


def set_command(name: str, value: Any) -> str:
    """The exact `pulumi config set` line that sets ``name`` (lists go in with ``--path``)."""
    if isinstance(value, list | tuple):
        lines = [f"pulumi config rm {key(name)}"] if len(value) > 1 else []
        lines += [
            f"pulumi config set --path '{key(name)}[{i}]' {item}" for i, item in enumerate(value)
        ]
        return "\n    ".join(lines)
    if isinstance(value, bool):
        value = str(value).lower()
    return f"pulumi config set {key(name)} {value}"


def load(
    source: ConfigSource | None = None, *, lookup_ip: Callable[[], str] | None = None
) -> Settings:
    """Read and check every key. ``lookup_ip`` finds the operator's address when none is set."""
    source = source if source is not None else pulumi.Config(NAMESPACE)
    raw = _Raw(source)
    gpu = raw.boolean("gpu")
    ami_id = raw.string("amiId") or None
    instance_type = _instance_type(raw.string("instanceType"), gpu, ami_id)
    open_world = raw.boolean("openToTheWorld")
    return Settings(
        instance_type=instance_type,
        gpu=gpu,
        ami_id=_ami_id(ami_id),
        volume_size_gb=_volume_size(raw.integer("volumeSizeGb")),
        delete_volume_on_destroy=raw.boolean("deleteVolumeOnDestroy"),
        allowed_cidrs=_allowed_cidrs(raw.string_list("allowedCidrs"), open_world, lookup_ip),
        open_to_the_world=open_world,
        api_port=_api_port(raw.integer("apiPort")),
        idle_stop_minutes=_idle_minutes(raw.integer("idleStopMinutes")),
        max_run_hours=_max_run_hours(raw.integer("maxRunHours")),
        ssh_public_key=_ssh_public_key(raw.string("sshPublicKey")),
    )


class _Raw:
    """Typed reads with the CLI's own spelling of values; absent keys take ``DEFAULTS``."""

    def __init__(self, source: ConfigSource) -> None:
        self._source = source

    def _get(self, name: str) -> str | None:
        value = self._source.get(name)
        return None if value is None else str(value)

    def string(self, name: str) -> str:
        value = self._get(name)
        return DEFAULTS[name] if value is None else value.strip()

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if value is None:
            return DEFAULTS[name]
        if value.strip().lower() not in ("true", "false"):
            raise ConfigError(
                f"{key(name)} is {value!r}, but it must be true or false. "
                f"Fix: {set_command(name, not DEFAULTS[name])}"
            )
        return value.strip().lower() == "true"

    def integer(self, name: str) -> int:
        value = self._get(name)
        if value is None:
            return DEFAULTS[name]
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(
                f"{key(name)} is {value!r}, but it must be a whole number. "
                f"Fix: {set_command(name, DEFAULTS[name])}"
            ) from None

    def string_list(self, name: str) -> list[str]:
        value = self._get(name)
        if value is None:
            return list(DEFAULTS[name])
        example = ["203.0.113.7/32"]
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            items = None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(
                f"{key(name)} is {value!r}, but it must be a list of strings. "
                f"Set it item by item:\n    {set_command(name, example)}"
            )
        return [i.strip() for i in items]


def _instance_type(value: str, gpu: bool, ami_id: str | None) -> str:
    name = "instanceType"
    if not value:
        return GPU_INSTANCE_TYPE if gpu else CPU_INSTANCE_TYPE
    if not _INSTANCE_TYPE.match(value):
        raise ConfigError(
            f"{key(name)} is {value!r}, which is not an EC2 instance type (like m5.large). "
            f"Fix: {set_command(name, CPU_INSTANCE_TYPE)}"
        )
    family = value.split(".")[0]
    if ami_id:  # the operator chose the image, so the type/image match is theirs to make
        return value
    if family in UNSUPPORTED_GPU_FAMILIES:
        raise ConfigError(
            f"{key(name)} is {value}, but {family} cannot run here: "
            f"{UNSUPPORTED_GPU_FAMILIES[family]}. Pick a supported GPU type. "
            f"Fix: {set_command(name, GPU_INSTANCE_TYPE)}"
        )
    if _GRAVITON_FAMILY.match(family):
        raise ConfigError(
            f"{key(name)} is {value}, an arm64 (Graviton) type, but the images are amd64. "
            f"Fix: {set_command(name, CPU_INSTANCE_TYPE)}"
        )
    if gpu and family not in GPU_FAMILIES:
        families = ", ".join(sorted(GPU_FAMILIES))
        raise ConfigError(
            f"{key('gpu')} is true, but {key(name)} is {value}, which has no NVIDIA GPU the "
            f"Deep Learning AMI supports (families: {families}). "
            f"Fix: {set_command(name, GPU_INSTANCE_TYPE)}\n"
            f"  or, for a CPU host: pulumi config rm {key('gpu')}"
        )
    if not gpu and family in GPU_FAMILIES:
        raise ConfigError(
            f"{key(name)} is {value}, a GPU type, but {key('gpu')} is false, so the host "
            f"would boot plain Ubuntu without NVIDIA drivers. Fix: {set_command('gpu', True)}"
        )
    return value


def _ami_id(value: str | None) -> str | None:
    if value and not re.fullmatch(r"ami-[0-9a-f]{8,17}", value):
        raise ConfigError(
            f"{key('amiId')} is {value!r}, which is not an AMI id (ami-0123456789abcdef0). "
            f"Fix: pulumi config rm {key('amiId')}   # to use the looked-up image"
        )
    return value


def _volume_size(value: int) -> int:
    if not MIN_VOLUME_GB <= value <= MAX_VOLUME_GB:
        raise ConfigError(
            f"{key('volumeSizeGb')} is {value}, but the volume must be {MIN_VOLUME_GB}-"
            f"{MAX_VOLUME_GB} GB (100 holds GPT-2 runs, PyTorch and a TGI image). "
            f"Fix: {set_command('volumeSizeGb', DEFAULTS['volumeSizeGb'])}"
        )
    return value


def _api_port(value: int) -> int:
    if value == 22 or not 1024 <= value <= 65535:
        raise ConfigError(
            f"{key('apiPort')} is {value}, but the API port must be 1024-65535 (lower ports "
            f"need root on the VM; 22 is SSH). Fix: {set_command('apiPort', DEFAULTS['apiPort'])}"
        )
    return value


def _idle_minutes(value: int) -> int:
    if value != 0 and value < MIN_IDLE_MINUTES:
        fix = set_command("idleStopMinutes", DEFAULTS["idleStopMinutes"])
        raise ConfigError(
            f"{key('idleStopMinutes')} is {value}, but it must be 0 (never stop) or at least "
            f"{MIN_IDLE_MINUTES}. Fix: {fix}"
        )
    return value


def _max_run_hours(value: int) -> int:
    if not 0 <= value <= MAX_RUN_HOURS:
        raise ConfigError(
            f"{key('maxRunHours')} is {value}, but it must be 0 (no cap) or 1-{MAX_RUN_HOURS} "
            "hours: the VM stops itself that long after each start, even mid-job, so a forgotten "
            f"job cannot run up a bill. Fix: {set_command('maxRunHours', DEFAULTS['maxRunHours'])}"
        )
    return value


def _ssh_public_key(value: str) -> str | None:
    if not value:
        return None
    parts = value.split()
    try:
        valid = (
            len(parts) >= 2
            and parts[0] in _SSH_KEY_TYPES
            and bool(base64.b64decode(parts[1], validate=True))
        )
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise ConfigError(
            f"{key('sshPublicKey')} is not an OpenSSH public key EC2 accepts (ssh-ed25519 or "
            f"ssh-rsa). Give the .pub file's one line, not the private key. Fix: "
            f'pulumi config set {key("sshPublicKey")} "$(cat ~/.ssh/id_ed25519.pub)"'
        )
    return value


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One CIDR, strictly: a bare address means that one host; host bits must be zero."""
    name = "allowedCidrs"
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        hint = ""
        try:
            loose = ipaddress.ip_network(text, strict=False)
            host = text.split("/")[0]
            hint = f" Did you mean {loose} (the network) or {host}/{loose.max_prefixlen}?"
        except ValueError:
            pass
        raise ConfigError(
            f"{key(name)} has {text!r}, which is not a CIDR like 203.0.113.7/32 ({err}).{hint} "
            f"Fix:\n    {set_command(name, ['203.0.113.7/32'])}"
        ) from None


def _allowed_cidrs(
    items: list[str], open_world: bool, lookup_ip: Callable[[], str] | None
) -> tuple[str, ...]:
    name = "allowedCidrs"
    networks = [parse_cidr(item) for item in items]
    for network in networks:
        if is_world(network) and not open_world:
            own = set_command(name, ["203.0.113.7/32"])
            world = set_command("openToTheWorld", True)
            raise ConfigError(
                f"{key(name)} has {network}, which lets anyone on the internet reach SSH and "
                f"the API. Give your own address instead:\n    {own}\n"
                f"or, if you really mean the whole internet: {world}"
            )
    if not networks and open_world:
        pulumi.log.warn(
            f"{key('openToTheWorld')} is true: SSH and the API are open to 0.0.0.0/0. "
            "Anyone can try to log in or use the API; set an API key."
        )
        return ("0.0.0.0/0",)
    if not networks:
        networks = [_looked_up_network(lookup_ip)]
    return tuple(dict.fromkeys(str(n) for n in networks))


def _looked_up_network(
    lookup_ip: Callable[[], str] | None,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    name = "allowedCidrs"
    how = f"Say which addresses may connect:\n    {set_command(name, ['203.0.113.7/32'])}\n"
    how += "(your address is what https://checkip.amazonaws.com shows in a browser)"
    if lookup_ip is None:
        raise ConfigError(f"{key(name)} is empty and no address look-up was given. {how}")
    try:
        address = ipaddress.ip_address(lookup_ip())
    except (OSError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"{key(name)} is empty and your public IP address could not be found: {err}. {how}"
        ) from None
    return ipaddress.ip_network(address)
