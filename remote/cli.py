"""How every `fab` task is declared, so that `--help` works wherever it is typed.

    @task(positional=["run"], help={"run": "the run to download"})
    def fetch(c, run): ...

    fab fetch --help      fab fetch -h      fab --help fetch      # all three print the same help

invoke fills a task's positional arguments before it looks for flags it does not know, so in
`fab fetch --help` the word ``--help`` became the run's name (and `fab train --help` a job
name): only tasks without positional arguments, or with them all given, reached invoke's own
per-task help. Every task here is a ``HelpfulTask``: handed ``-h`` or ``--help`` where a
positional argument belongs, it prints exactly what `fab --help <task>` prints and runs
nothing. No task has a positional argument for which ``--help`` is a sensible value (a run
name cannot start with ``-``; `fab prompt -- "--help"` is not a question worth asking).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import invoke

HELP_TOKENS = frozenset({"-h", "--help"})


class HelpfulTask(invoke.Task):
    """An invoke task that answers ``-h``/``--help`` given in place of a positional argument."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        given = [*args[1:], *(kwargs.get(name) for name in self.positional)]
        if any(isinstance(v, str) and v in HELP_TOKENS for v in given):
            print_task_help(self.name)
            return None
        return super().__call__(*args, **kwargs)


def task(**options: Any) -> Callable[[Callable[..., Any]], HelpfulTask]:
    """``invoke.task`` with the project's defaults: a ``HelpfulTask``, long flags only (a
    short ``-r`` that means --run for one task and --raw for another helps nobody)."""
    return invoke.task(klass=HelpfulTask, **{"auto_shortflags": False, **options})


def print_task_help(name: str) -> None:
    """What `fab --help NAME` prints, by asking a fresh `fab` program exactly that: one
    formatter for every spelling of the question."""
    from fabric.main import make_program

    from remote import paths

    make_program().run(["fab", "--search-root", str(paths.ROOT), "--help", name], exit=False)
