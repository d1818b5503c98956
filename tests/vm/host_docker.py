"""A real Docker engine on this machine, for launch_gpt2.sh: ``dockerd`` started here (there is
no systemd to start it), inside a network namespace of its own so that its bridge, iptables rules
and published ports never touch this machine's network.

Why not the booted VM's Docker: it runs containers, but cannot apply ``--cpus``, which the
script always passes. This host mounts cgroup v1 with every controller bound to its v1
hierarchies; the VM's cgroup v2 tree (``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``) therefore has no
cpu controller, and Docker refuses: "NanoCPUs can not be set, as your kernel does not support
CPU CFS scheduler or the cgroup is not mounted". Here dockerd uses the v1 cpu controller.

    with host_docker(base) as engine:          # engine.env: DOCKER_HOST for the docker CLI
        engine.run_in_netns(["bash", "launch_gpt2.sh"], env=...)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vm_machine import mounts_under, run

DOCKERD = "/usr/sbin/dockerd"


def missing() -> str:
    """Why no engine can start here, or ""."""
    if os.geteuid() != 0:
        return "starting dockerd needs root"
    if not Path(DOCKERD).exists() or not shutil.which("docker"):
        return "Docker is not installed (apt-get install docker.io)"
    return ""


@dataclass
class Engine:
    netns: str
    socket: Path

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.socket}"}

    def docker(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, env={**os.environ, **self.env}
        )

    def run_in_netns(
        self, argv: list[str], env: dict[str, str], **kw
    ) -> subprocess.CompletedProcess:
        """A command in the engine's network namespace (where its published ports are)."""
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", *argv],
            env={**os.environ, **self.env, **env},
            capture_output=True,
            text=True,
            **kw,
        )


@contextlib.contextmanager
def host_docker(base: Path) -> Iterator[Engine]:
    """An engine whose files live in ``base``/tcdk-XXXXXX and /run/tcdk-XXXXXX (its sockets:
    a unix socket's path must stay short)."""
    netns = f"tcdk-{uuid.uuid4().hex[:6]}"
    workdir, sockets = base / netns, Path("/run") / netns
    engine = Engine(netns, sockets / "docker.sock")
    workdir.mkdir(parents=True)
    sockets.mkdir(mode=0o700)
    run("ip", "netns", "add", netns)
    proc = None
    try:
        run("ip", "-n", netns, "link", "set", "lo", "up")
        argv = [
            "nsenter",
            f"--net=/run/netns/{netns}",  # not `ip netns exec`: that remounts /sys, cgroups and all
            DOCKERD,
            f"--host=unix://{engine.socket}",
            f"--data-root={workdir / 'data'}",
            f"--exec-root={sockets / 'exec'}",
            f"--pidfile={sockets / 'dockerd.pid'}",
        ]
        log = (workdir / "dockerd.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while engine.docker("info").returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "dockerd.log").read_text()[-2000:]
                raise RuntimeError(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)
        yield engine
    finally:
        if proc is not None:
            with contextlib.suppress(Exception):
                ids = engine.docker("ps", "-aq").stdout.split()
                if ids:
                    engine.docker("rm", "-f", *ids)
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        run("ip", "netns", "del", netns, check=False)
        for folder in (workdir, sockets):
            for point in reversed(mounts_under(folder)):
                run("umount", "--lazy", point, check=False)
            if not mounts_under(folder):
                shutil.rmtree(folder, ignore_errors=True)
