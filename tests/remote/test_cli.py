"""`--help` on every task, however it is placed (remote/cli.py), through the real `fab` program.

Nothing may run: no stack is readable (the outputs file does not exist) and the local state
folder must stay empty, so a task that took ``--help`` for an argument would fail or leave
something behind.
"""

from __future__ import annotations

import pytest
from remote_harness import fab_fixture  # noqa: F401

from remote.cli import HelpfulTask
from remote.tasks import ns

TASKS = sorted(ns.task_names)


@pytest.fixture
def nowhere(tmp_path):
    return {
        "TINYCLOUD_STACK_OUTPUTS": str(tmp_path / "no-such-outputs.json"),
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_LOCAL_RUNS": str(tmp_path / "runs"),
        "TINYCLOUD_RENDERED": str(tmp_path / "rendered"),
    }


def test_every_task_is_declared_the_helpful_way():
    assert TASKS, "the collection is empty"
    assert all(isinstance(ns[name], HelpfulTask) for name in TASKS)
    assert any(ns[name].positional for name in TASKS), "no task has a positional argument"


@pytest.mark.parametrize("name", TASKS)
def test_help_is_the_same_wherever_it_is_typed(fab, nowhere, tmp_path, name):
    reference = fab(nowhere, "--help", name)
    assert reference.code == 0, reference.text
    assert reference.out.startswith(f"Usage: fab [--core-opts] {name} ")
    assert "Docstring:" in reference.out and "Options:" in reference.out
    for argv in ([name, "--help"], [name, "-h"]):
        r = fab(nowhere, *argv)
        assert r.code == 0, f"fab {' '.join(argv)}: {r.text}"
        assert r.out == reference.out, f"fab {' '.join(argv)} printed something else"
        assert not r.err, r.err
    assert not (tmp_path / "state").exists(), "asking for help ran the task"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "rendered").exists()


def test_a_positional_task_still_runs_with_a_real_argument(fab, nowhere):
    r = fab(nowhere, "fetch", "some-run")
    assert r.code == 1 and "Run `pulumi up` first" in r.err  # it ran, and needed the stack
