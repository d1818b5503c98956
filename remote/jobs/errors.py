"""The one exception type a job shows its user as a plain line, not a traceback.

Raise ``JobError("what was wrong. How to fix it")`` for anything the user can fix (a missing
file, a wrong column, a block size too long for the data); a job's ``main`` prints it as
``error: <message>`` on stderr and exits 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class JobError(Exception):
    """A problem with the job's input that the user can fix; the message says how."""
