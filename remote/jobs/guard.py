"""How a job ends: one exit code and one run.json status for each way a run can stop.

Every job's ``main`` hands its work to a ``Guard``::

    guard = Guard(dist.setup())
    return guard.main(lambda: train(args, guard))   # train() calls guard.track(run) once made

- the body returns: its exit code; the status is what the job set (``completed``).
- ``JobError`` (input the user can fix): ``error: <what>. <how to fix>`` on stderr, no
  traceback, status ``failed``, exit 1.
- ``Interrupted`` (SIGTERM/SIGINT, checkpoint saved): status ``interrupted``, exit 143 for
  SIGTERM, 130 for SIGINT; a plain KeyboardInterrupt counts as SIGINT.
- anything else is a bug: status ``failed`` with the exception, and the traceback is kept.

Only rank 0 prints and writes; every rank returns the same code. The run's train.log handler
is detached at the end whatever happened, so jobs run one after another in one process (tests,
the demo) each keep their own log.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from facts import RunState
from remote.jobs import dist, rundir
from remote.jobs.errors import EXIT_ERROR, Interrupted, JobError, message

log = logging.getLogger("tinycloud")


class Guard:
    """Runs a job's body and turns the way it ended into an exit code and a run status."""

    def __init__(self, d: dist.Dist | None = None):
        self.started = time.monotonic()  # the session's time counts from here (run.json)
        self.d = d or dist.Dist()
        self.run: rundir.RunDir | None = None

    def track(self, run: rundir.RunDir | None) -> rundir.RunDir | None:
        """Remember the run dir as soon as it exists, so any later ending is recorded in it,
        and its elapsed time counts from the start of this job, not of the run dir."""
        self.run = run
        if run is not None:
            run.count_from(self.started)
        return run

    def main(self, body: Callable[[], int]) -> int:
        together = False  # did every rank finish its work? (then they leave in step)
        try:
            code = body()
            together = True
            return code
        except JobError as exc:
            if self.d.is_main:
                print(f"error: {message(exc)}", file=sys.stderr)
                log.debug("error", exc_info=True)
            self._finish(RunState.FAILED, error=message(exc))
            return EXIT_ERROR
        except KeyboardInterrupt as exc:  # Interrupted, or a Ctrl-C before any handler was set
            stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            if self.run is not None:
                self.run.plot_loss()
                self._finish(RunState.INTERRUPTED, **stop.fields)
                print(
                    f"interrupted by {signal.Signals(stop.signum).name}; continue with "
                    f"--resume --name {self.run.path.name}",
                    file=sys.stderr,
                )
            return stop.exit_code
        except BaseException as exc:  # a bug: keep the traceback, never leave "running" behind
            self._finish(RunState.FAILED, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if self.run is not None:
                self.run.close()
            dist.cleanup(self.d, together=together)

    def _finish(self, status: str, **fields: Any) -> None:
        if self.run is not None:
            self.run.finish(status, **fields)
