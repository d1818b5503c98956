"""The stand-in for the Ubuntu 24.04 AMI: the recipe, and the one cached build of it per machine.

Debian's archive is the only OS archive this machine (and CI) reaches, so the stand-in is Debian
13 (trixie) made by ``mmdebstrap``: systemd 257, cloud-init 25.1, OpenSSH 10.0 and Python 3.13,
where Ubuntu 24.04 has systemd 255, OpenSSH 9.6 and Python 3.12 (and its own cloud-init
updates). It holds what the AMI has that the VM side relies on (systemd as PID 1, cloud-init,
sshd, sudo, python3, iproute2, nftables, apt, systemd-networkd and -resolved) and a cloud.cfg.d
drop-in that makes ``ubuntu`` the default user as on the AMI. How it differs from the AMI is
listed in docs/infra.md ("The booted stand-in VM").

    python tests/vm/vm_image.py     # build (or find) the cached image; print its path

The build takes about a minute and is kept in /var/cache/tinycloud-vm/image-<digest>, the digest
being this file's own: edit the recipe and the next run builds afresh. Each test session boots a
throwaway copy (see vm_machine.py), so the cached tree is never booted itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = "trixie"
ARCHIVE = "http://deb.debian.org/debian"
SOURCES = (  # what apt sees on the VM: the release, its updates, its security fixes (as Ubuntu)
    f"deb {ARCHIVE} {SUITE} main",
    f"deb {ARCHIVE} {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
PACKAGES = (
    # PID 1, the bus and the network stack Ubuntu boots with (netplan renders to networkd)
    "systemd", "systemd-sysv", "dbus", "systemd-resolved", "iproute2", "nftables",
    # first boot and logging in
    "cloud-init", "openssh-server", "sudo", "locales", "ca-certificates",
    # what Ubuntu's server image carries and the tinycloud scripts call
    "python3", "curl", "procps", "less", "apt-utils", "git", "rsync",
)  # fmt: skip

# Ubuntu's cloud.cfg default user, but for the lxd group, which Debian has no package for.
DEFAULT_USER_DROP_IN = """\
# tinycloud stand-in for the Ubuntu 24.04 AMI: the default user is `ubuntu`, as there.
system_info:
  default_user:
    name: ubuntu
    lock_passwd: true
    gecos: Ubuntu
    groups: [adm, cdrom, dip, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
# The stand-in's only datasource is the NoCloud seed the tests write (the AMI's is Ec2).
datasource_list: [NoCloud, None]
"""

CUSTOMIZE = (
    # No host name, machine id or SSH host key of the build machine: each boot makes its own.
    'echo localhost > "$1/etc/hostname"',
    'rm -f "$1"/etc/ssh/ssh_host_*',
    ': > "$1/etc/machine-id"',
    # Ubuntu's network: networkd (cloud-init renders its config) and resolved.
    'chroot "$1" systemctl enable systemd-networkd.service systemd-resolved.service',
    'echo "en_US.UTF-8 UTF-8" > "$1/etc/locale.gen" && chroot "$1" locale-gen',
)

CACHE = Path(os.environ.get("TINYCLOUD_VM_CACHE", "/var/cache/tinycloud-vm"))


def digest() -> str:
    """Names the build: any change to this recipe makes a new image."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def image_dir() -> Path:
    return CACHE / f"image-{digest()}"


def missing_tools() -> list[str]:
    return [t for t in ("mmdebstrap", "systemd-nspawn", "ip", "nft") if not shutil.which(t)]


def cached_image(log=print) -> Path:
    """The built image, building it first if this machine has none (one build at a time)."""
    target = image_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "etc" / "os-release").exists():
            log(f"building the stand-in VM image in {target} (about a minute, once)")
            build(target)
            _drop_older(target)
    return target


def build(target: Path) -> None:
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    drop_in = staging.with_name("99-tinycloud-standin.cfg")
    drop_in.write_text(DEFAULT_USER_DROP_IN)
    hooks = [f"--customize-hook={h}" for h in CUSTOMIZE]
    hooks.append(
        f"--customize-hook=copy-in {drop_in} /etc/cloud/cloud.cfg.d/"
    )  # copy-in keeps the name
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--include=" + ",".join(PACKAGES),
        *hooks,
        SUITE,
        str(staging),
        "\n".join(SOURCES),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed:\n{done.stderr[-3000:]}")
        staging.rename(target)
    finally:
        drop_in.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)


def _drop_older(keep: Path) -> None:
    """Images of older recipes are dead weight (about 300 MB each)."""
    for old in CACHE.glob("image-*"):
        if old != keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("building the image needs root (mmdebstrap's root mode)")
    print(cached_image())
