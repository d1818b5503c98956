"""A stand-in for the TGI image, made offline: a root file system of one static busybox and a
start script, for ``docker import``. No registry is reachable from the tests, and the real image
is 12 GB; what the tests check is launch_gpt2.sh meeting a real Docker engine.

The container records what it was started with in the ``/data`` volume (one argument a line in
``tgi-args``; ``API_KEY`` from its environment as a sha256 in ``tgi-key.sha256``, so the key is
never written out) and then answers ``GET /health`` on port 80, as TGI does when it is ready.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one binary, no libraries
ENTRYPOINT = "/tgi-standin.sh"
IMPORT_CHANGES = (f'ENTRYPOINT ["{ENTRYPOINT}"]', "ENV PATH=/bin")  # docker import --change
SCRIPT = """#!/bin/sh
for arg in "$@"; do echo "$arg"; done > /data/tgi-args
printf %s "$API_KEY" | sha256sum | cut -d' ' -f1 > /data/tgi-key.sha256
echo "stand-in TGI: Connected"
exec httpd -f -p 80 -h /www
"""


def missing() -> str:
    """Why the stand-in cannot be built here, or ""."""
    return "" if BUSYBOX.exists() else "no /bin/busybox here (apt-get install busybox-static)"


def build_tar(dest: Path) -> Path:
    """The root file system as a tar that ``docker import`` takes."""
    with tarfile.open(dest, "w") as tar:
        _add_file(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in ("sh", "httpd", "sha256sum", "cut", "printf", "echo"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        _add_file(tar, ENTRYPOINT.lstrip("/"), SCRIPT.encode(), 0o755)
        _add_file(tar, "www/health", b"ok\n", 0o644)
        for folder in ("data", "model", "tmp"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
    return dest


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))
