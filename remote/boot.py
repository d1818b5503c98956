"""Wait for a fresh host to finish its first boot (cloud-init), showing progress.

The tinycloud VM's cloud-init writes a ready marker as its very last step (``VM_READY_MARKER`` in
``facts.py``); until it exists, Docker, uv or the runs folder may be half-installed.
``TINYCLOUD_READY_MARKER`` moves the marker (the tests' stand-in VM uses a temp file).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from invoke import Exit

from facts import VM_READY_MARKER
from remote import paths
from remote.runner import Runner

q = shlex.quote


def ready_marker() -> str:
    override = paths.env("READY_MARKER")
    if override:
        return override
    return VM_READY_MARKER


def cloud_init_status(runner: Runner) -> str:
    """``running``, ``done``, ``error``, ``disabled``...; ``absent`` without cloud-init."""
    if not runner.has_command("cloud-init"):
        return "absent"
    r = runner.run("cloud-init status 2>/dev/null | sed -n 's/^status: //p'", warn=True)
    return r.stdout.strip() or "unknown"


def wait_for_boot(
    runner: Runner,
    *,
    required: bool,
    timeout: float = 900,
    poll: float = 1.0,
    progress: Callable[[str], None] = print,
) -> float:
    """Block until the ready marker exists; seconds waited.

    ``required`` is False for a host given with --host: a machine tinycloud did not build has
    no marker, so only a cloud-init that is still running is waited for.
    """
    marker = ready_marker()
    start = time.monotonic()
    last = ""
    while not runner.run(f"test -e {q(marker)}", warn=True).ok:
        status = cloud_init_status(runner)
        if not required and status != "running":
            break
        if status == "error":
            raise Exit(
                "cloud-init failed on the host. See /var/log/cloud-init-output.log there "
                "(`fab ssh --open`), fix the cause and `pulumi up` again."
            )
        waited = time.monotonic() - start
        if waited > timeout:
            raise Exit(
                f"the host is still booting after {waited:.0f}s (cloud-init: {status}, "
                f"no {marker}). Look at /var/log/cloud-init-output.log via `fab ssh`."
            )
        note = f"waiting for cloud-init to finish (status: {status}, {waited:.0f}s)"
        if status != last or int(waited) % 15 < poll:
            progress(note)
            last = status
        time.sleep(poll)
    return time.monotonic() - start
