"""SIGTERM/SIGINT as a request to stop at the next safe point, not a kill.

    with StopSignal() as stop:
        for step in ...:
            ...one step...
            if stop.signum:                       # asked to stop: checkpoint, then leave
                save_checkpoint()
                raise Interrupted(stop.signum)    # guard.Guard: status interrupted, exit 143/130

The first signal only sets ``signum``; the loop finishes its step and saves. A second one means
"now": it raises ``Interrupted`` at once, checkpoint or not. Handlers are installed only in the
main thread (Python allows no other) and the previous ones are put back on exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from remote.jobs.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger("tinycloud")


class StopSignal:
    def __init__(self) -> None:
        self.signum = 0  # the signal received; 0 while none
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum:  # asked twice: stop now
            raise Interrupted(signum, error="stopped twice; the last checkpoint is kept")
        self.signum = signum
        log.warning("got %s: stopping at the next safe point", signal.Signals(signum).name)
