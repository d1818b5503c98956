"""The exceptions that end a job the user's way, not with a traceback.

- ``JobError("what was wrong. How to fix it")``: input the user can fix (a missing file, a
  wrong column, a block size too long for the data). Printed as ``error: <message>``, exit 1.
- ``Interrupted(signum, **fields)``: SIGTERM/SIGINT stopped the job after it saved a checkpoint;
  status ``interrupted``, exit 128 + signum (143 for SIGTERM, 130 for SIGINT).

``guard.Guard`` is where a job's ``main`` turns them into exit codes and run statuses.
"""

from __future__ import annotations

import signal
from typing import Any

EXIT_ERROR = 1  # a user-facing error (argparse's own errors exit 2)


class JobError(Exception):
    """A problem with the job's input that the user can fix; the message says how."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the job after it saved what it had (``fields`` go into run.json).

    A KeyboardInterrupt, so no ``except Exception`` on the way up can swallow it.
    """

    def __init__(self, signum: int = signal.SIGINT, **fields: Any):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.fields = int(signum), fields

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """The shell's convention for "killed by signum": 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


def message(exc: BaseException) -> str:
    """One line, ending in a full stop, whatever the exception's text ended with."""
    return str(exc).strip().rstrip(".") + "."
