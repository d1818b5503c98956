"""A booted stand-in VM: a throwaway copy of the cached image under ``systemd-nspawn --boot``.

What a test gets is a real init (systemd as PID 1) running the real first boot (cloud-init with
the user data ``infra`` renders for `pulumi up`), behind a network of its own:

- **network**: a namespace with one veth pair made here, addresses in 10.213.N.0/24 that exist
  only on this machine (the host end .1, the VM .2; cloud-init configures the VM end from the
  seed's ``network-config``, as EC2's metadata does). An nftables table of its own lets the VM
  reach the package registries (Debian's archive and PyPI, the addresses their names have here)
  and the DNS server, masqueraded, and nothing else: not the host's services, not the internet.
  The host's own network is never shared: the image's network stack would take it over.
- **seed**: NoCloud files in the copy's /var/lib/cloud/seed/nocloud: ``user-data`` exactly as
  rendered, ``meta-data`` with the login key as EC2's metadata carries it (under the key pair's
  name), ``network-config``.
- **uv cache**: this machine's is shared with the VM's ``ubuntu`` user through an ID-mapped
  bind mount (files the VM writes stay root's on disk), so `fab setup` copies wheels rather
  than downloading gigabytes. The VM finds it through /etc/xdg/uv/uv.toml, which also points
  uv at the system's CA store. (apt's downloads are not shared: the mirror is quick, and two
  sessions would contend for apt's lock on one archive folder.)

Why ``--keep-unit --register=no``: this host has no systemd as PID 1 and no system bus, which
nspawn otherwise needs to register the machine. Why ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``: the
host mounts cgroup v1 with a v2 hierarchy beside it, and systemd 257 no longer runs on v1.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REGISTRIES = ("deb.debian.org", "pypi.org", "files.pythonhosted.org")
SUBNET_PREFIX = "10.213"
NETWORK_LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "tinycloud-vm-net.lock"
VM_UID = 1000  # cloud-init's default user is the first account: `ubuntu`, uid 1000
UV_CACHE_IN_VM = "/var/cache/tinycloud-uv"


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


# --- the network -------------------------------------------------------------------------------


def registry_addresses() -> list[str]:
    return sorted({info[4][0] for n in REGISTRIES for info in socket.getaddrinfo(n, 443, 2)})


def dns_servers() -> list[str]:
    """This machine's IPv4 name servers, which the VM is let through to. One on loopback (a
    local stub resolver) is out of the VM's reach, so it cannot be the only one."""
    servers = []
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
            servers.append(parts[1])
    usable = [s for s in servers if not ipaddress.ip_address(s).is_loopback]
    if not usable:
        raise RuntimeError(
            f"/etc/resolv.conf names no name server the VM can reach ({servers or 'none'}): "
            "add the upstream one (e.g. `resolvectl status` shows it) to /etc/resolv.conf"
        )
    return usable


def _free_subnet() -> int:
    used = run("ip", "-4", "-o", "addr").stdout
    for n in range(10, 250):
        if f" {SUBNET_PREFIX}.{n}." not in used:
            return n
    raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24 on this machine")


@dataclass
class Network:
    """The VM's namespace, veth pair and firewall; ``close`` removes all three."""

    name: str
    subnet: int
    dns: list[str]
    registries: list[str]
    forwarding_was: str = "0"

    @property
    def host_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    @property
    def vm_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.2"

    @property
    def cidr(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.0/24"

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    @classmethod
    def create(cls, name: str) -> Network:
        dns, registries = dns_servers(), registry_addresses()
        # Choosing a free subnet and taking it is one step for every test run on this machine
        # (two sessions, or xdist workers): else two VMs can share an address.
        with open(NETWORK_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            net = cls(name, _free_subnet(), dns, registries)
            try:
                net._open()
            except BaseException:
                net.close()
                raise
        return net

    def _open(self) -> None:
        name = self.name
        run("ip", "netns", "add", name)
        run("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name)
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", name)
        run("ip", "link", "set", name, "up")
        run("nft", "-f", "-", input=self.ruleset())
        self.forwarding_was = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    def ruleset(self) -> str:
        """Forward the VM's traffic to the registries (HTTP/S) and DNS only; masquerade it."""
        regs = ", ".join(self.registries)
        dns = ", ".join(self.dns)
        veth = self.name
        return f"""
table ip {self.table} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{veth}" ip daddr {{ {regs} }} tcp dport {{ 80, 443 }} accept
        iifname "{veth}" ip daddr {{ {dns} }} meta l4proto {{ tcp, udp }} th dport 53 accept
        iifname "{veth}" counter drop
        oifname "{veth}" ct state established,related accept
        oifname "{veth}" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{veth}" ct state established,related accept
        iifname "{veth}" counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {self.cidr} oifname != "{veth}" masquerade
    }}
}}
"""

    @property
    def table(self) -> str:
        return self.name.replace("-", "_")

    def network_config(self) -> str:
        """cloud-init network config v2 for the VM end (EC2 gives DHCP; a static twin here)."""
        config = {
            "version": 2,
            "ethernets": {
                "eth0": {
                    "addresses": [f"{self.vm_ip}/24"],
                    "routes": [{"to": "0.0.0.0/0", "via": self.host_ip}],
                    "nameservers": {"addresses": self.dns},
                }
            },
        }
        return json.dumps(config, indent=2) + "\n"

    def close(self) -> None:
        run("nft", "delete", "table", "ip", self.table, check=False)
        run("ip", "link", "del", self.name, check=False)
        run("ip", "netns", "del", self.name, check=False)
        if self.forwarding_was == "0" and not _other_vm_links(self.name):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("0\n")


def _other_vm_links(mine: str) -> bool:
    return any(n.startswith("tcvm-") and n != mine for n in os.listdir("/sys/class/net"))


# --- an ID-mapped bind mount: this machine's uv cache, writable by the VM's user -------------

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # x86_64 and arm64 alike
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _AT_RECURSIVE = 1, 0x1000, 0x8000
_MOUNT_ATTR_IDMAP, _MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 0x00100000, 0x4, -100


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def idmapped_mount(source: Path, dest: Path, uid: int) -> None:
    """Mount ``source`` at ``dest`` so that its root-owned files appear owned by ``uid`` and
    what ``uid`` writes lands as root's: the VM's user shares the cache, the disk stays root's.
    (util-linux learned ``X-mount.idmap`` in 2.39; Debian 12 has 2.38, so the three syscalls.)"""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    holder = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        ns_path = f"/proc/{holder.pid}/ns/user"
        deadline = time.monotonic() + 5
        while os.readlink(ns_path) == os.readlink("/proc/self/ns/user"):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --user did not make a user namespace")
            time.sleep(0.01)
        for kind in ("uid", "gid"):
            Path(f"/proc/{holder.pid}/{kind}_map").write_text(f"0 {uid} 1\n")
        userns = os.open(ns_path, os.O_RDONLY)
        try:
            tree = check(
                libc.syscall(
                    _SYS_OPEN_TREE,
                    _AT_FDCWD,
                    str(source).encode(),
                    _OPEN_TREE_CLONE | os.O_CLOEXEC,
                ),
                f"open_tree {source}",
            )
            attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns)
            size = ctypes.c_size_t(ctypes.sizeof(attr))
            check(
                libc.syscall(
                    _SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr), size
                ),
                "mount_setattr MOUNT_ATTR_IDMAP",
            )
            check(
                libc.syscall(
                    _SYS_MOVE_MOUNT,
                    tree,
                    b"",
                    _AT_FDCWD,
                    str(dest).encode(),
                    _MOVE_MOUNT_F_EMPTY_PATH,
                ),
                f"move_mount to {dest}",
            )
            os.close(tree)
        finally:
            os.close(userns)
    finally:
        holder.kill()
        holder.wait()


def host_uv_cache() -> Path:
    done = run("uv", "cache", "dir", check=False)
    return Path(done.stdout.strip() or Path.home() / ".cache" / "uv")


# --- the machine -------------------------------------------------------------------------------


@dataclass
class Machine:
    """One stand-in VM: its disk (a copy of the image), network and seed; boot it any times."""

    name: str
    workdir: Path  # the session's folder: root/ (the disk), console logs, the cache mount
    network: Network
    machine_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    proc: subprocess.Popen | None = None
    boots: int = 0

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def console_log(self) -> Path:
        return self.workdir / f"console-{self.boots}.log"

    @property
    def uv_cache_mount(self) -> Path:
        return self.workdir / "uv-cache"

    def seed(self, user_data: str, meta_data: dict) -> None:
        seed = self.root / "var/lib/cloud/seed/nocloud"
        seed.mkdir(parents=True, exist_ok=True)
        (seed / "user-data").write_text(user_data)
        (seed / "meta-data").write_text(json.dumps(meta_data, indent=2) + "\n")
        (seed / "network-config").write_text(self.network.network_config())
        for f in seed.iterdir():
            f.chmod(0o600)  # the user data holds the host's private key, as EC2's does

    def boot(self) -> None:
        """Start the machine (returns once PID 1 runs; cloud-init goes on by itself)."""
        if self.proc and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        self.boots += 1
        argv = [
            "systemd-nspawn",
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--network-namespace-path={self.network.netns_path}",
            "--capability=CAP_NET_ADMIN",  # its own network: networkd, nftables (as on EC2)
            # Docker's runc joins a session keyring (keyctl) and attaches the device-cgroup
            # program on cgroup v2 (bpf); nspawn's default syscall filter refuses both.
            "--system-call-filter=@keyring bpf",
            f"--directory={self.root}",
            f"--machine={self.name}",
            f"--uuid={self.machine_uuid}",
            f"--bind={self.uv_cache_mount}:{UV_CACHE_IN_VM}",
            "--console=read-only",
        ]
        env = {
            **os.environ,
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
            "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",  # its own /proc/sys/net, as a VM has
        }
        log = self.console_log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        deadline = time.monotonic() + 60
        while self.init_pid() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not boot:\n{self.console_tail()}")
            time.sleep(0.1)

    def init_pid(self) -> int | None:
        """The container's PID 1, seen from here: nspawn's child that runs systemd."""
        if not self.proc or self.proc.poll() is not None:
            return None
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sh(self, script: str, *, check: bool = True, timeout: float = 120):
        """Run a shell line as root inside the machine (all its namespaces)."""
        pid = self.init_pid()
        if pid is None:
            raise RuntimeError(f"{self.name} is not running")
        done = subprocess.run(
            ["nsenter", "-t", str(pid), "-a", "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"in the VM: {script!r} exited {done.returncode}\n{done.stdout}{done.stderr}"
            )
        return done

    def wait_stopped(self, timeout: float) -> int | None:
        """The nspawn exit code once the machine has powered off, or None after ``timeout``."""
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def poweroff(self, timeout: float = 90) -> None:
        """An orderly shutdown (nspawn passes SIGTERM on as the container's poweroff signal)."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        if self.wait_stopped(timeout) is None:
            self.proc.kill()
            self.proc.wait(30)

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])


def create(name: str, image: Path, base: Path) -> Machine:
    """A new machine from ``image``: its own disk copy, network and cache mount (not booted)."""
    workdir = base / name
    workdir.mkdir(parents=True)
    network = Network.create(name)
    machine = Machine(name, workdir, network)
    try:
        make_disk(machine.workdir / "disk.ext4", machine.root)
        run("cp", "-a", f"{image}/.", str(machine.root))
        trust_local_cas(machine.root)
        uv_toml = machine.root / "etc/xdg/uv/uv.toml"
        uv_toml.parent.mkdir(parents=True, exist_ok=True)
        uv_toml.write_text(
            "# tinycloud tests: this machine's uv cache, shared in (see tests/vm/vm_machine.py),\n"
            "# and the system's CA store, which trusts what this machine trusts.\n"
            f'cache-dir = "{UV_CACHE_IN_VM}"\nsystem-certs = true\n'
        )
        machine.uv_cache_mount.mkdir()
        idmapped_mount(host_uv_cache(), machine.uv_cache_mount, VM_UID)
    except BaseException:
        destroy(machine)
        raise
    return machine


DISK_SIZE = "40G"  # sparse: a session writes about 8 GB (two environments, Docker, apt)


def make_disk(disk: Path, mount_point: Path) -> None:
    """The VM's disk: ext4 in a sparse file, loop-mounted. Throwing it away is one unlink; the
    same files loose on this machine's disk (mounted with online discard) take minutes to
    delete one by one, a Python environment being tens of thousands of them."""
    run("truncate", "-s", DISK_SIZE, str(disk))
    run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", str(disk))
    mount_point.mkdir()
    run("mount", "-o", "loop", str(disk), str(mount_point))
    (mount_point / "lost+found").rmdir()


LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def trust_local_cas(root: Path) -> None:
    """The certificate authorities this machine added to its own store (a TLS-intercepting
    egress proxy signs the registries' certificates here), added to the VM's store too."""
    extra = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    if not extra:
        return
    dest = root / LOCAL_CAS.relative_to("/")
    dest.mkdir(parents=True, exist_ok=True)
    for cert in extra:
        shutil.copy2(cert, dest / cert.name)
    run("chroot", str(root), "update-ca-certificates")


def destroy(machine: Machine) -> None:
    """Power off, unmount, remove the network and the disk.

    The uv cache mount is this machine's real cache: the folder is removed only once nothing is
    mounted under it any more (a recursive delete through that mount would empty the cache)."""
    with contextlib.suppress(Exception):
        machine.poweroff()
    if machine.proc and machine.proc.poll() is None:
        machine.proc.kill()
    for mount_point in reversed(mounts_under(machine.workdir)):
        if run("umount", mount_point, check=False).returncode != 0:
            run("umount", "--lazy", mount_point, check=False)
    machine.network.close()
    left = mounts_under(machine.workdir)
    if left:
        raise RuntimeError(f"still mounted, so {machine.workdir} is left in place: {left}")
    shutil.rmtree(machine.workdir, ignore_errors=True)


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder`` in this mount namespace, outermost first."""
    top = str(folder.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 for a space, etc.
        if point == top or point.startswith(top + "/"):
            points.append(point)
    return sorted(points, key=len)


def vm_network_allows(address: str, network: Network) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(network.cidr)
