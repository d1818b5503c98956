"""Run a long-lived child (the tunnel's ssh) in the foreground, and stop it for certain.

`fab tunnel` is stopped by Ctrl-C in a terminal, or by SIGTERM from a supervisor or a test.
Either way the ssh under it must end too, or it keeps holding the local port. One SIGTERM
is not always enough: OpenSSH 9.2 (Debian 12) only checks for a signal between polls, so a
signal that lands while it is closing a forwarded connection sets a flag and then the client
sleeps in poll() until traffic arrives, which on an idle tunnel is never (seen about once in
a hundred stops). So the signal is repeated until the child ends, and after a grace period
it is killed.
"""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import suppress

RESEND_S = 0.5  # how often an unanswered SIGTERM is sent again


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave the blocking wait."""


def _stop(_signum: int, _frame: object) -> None:
    raise _Stop


def _end(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``child`` until it exits; SIGKILL it once ``grace`` seconds have passed."""
    deadline = time.monotonic() + grace
    while child.poll() is None and time.monotonic() < deadline:
        child.terminate()
        with suppress(subprocess.TimeoutExpired):
            child.wait(RESEND_S)
    if child.poll() is None:
        child.kill()
        child.wait()


def run_until_stopped(argv: list[str], grace: float = 5.0) -> int | None:
    """Run ``argv`` until it exits (its exit code) or until Ctrl-C or SIGTERM reach this
    process (None, after the child has ended as well)."""
    child = subprocess.Popen(argv)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return child.wait()
    except (KeyboardInterrupt, _Stop):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
        _end(child, grace)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
