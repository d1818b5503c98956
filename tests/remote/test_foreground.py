"""`fab tunnel`'s child handling: a stop reaches the child even when the child misses it.

The wrapper runs in its own process (it installs a SIGTERM handler, and the test signals it);
the child is a small Python program that behaves like ssh at its worst.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Counts the SIGTERMs it gets in argv[1]; exits on the Nth (argv[3], 0 = never), like an ssh
# whose first SIGTERM landed between two polls and was only noted.
CHILD = """
import pathlib, signal, sys, time
seen, ready, exit_on = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
count = 0
def on_term(signum, frame):
    global count
    count += 1
    seen.write_text(str(count))
    if count == exit_on:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the wrapper hears Ctrl-C in these tests
ready.write_text("ready")
while True:
    time.sleep(60)
"""

WRAPPER = """
import sys
from remote.foreground import run_until_stopped
print(repr(run_until_stopped(sys.argv[2:], grace=float(sys.argv[1]))), flush=True)
"""


def _start(tmp_path: Path, exit_on: int, grace: float = 5.0, argv: list[str] | None = None):
    seen, ready = tmp_path / "seen", tmp_path / "ready"
    child = argv or [sys.executable, "-c", CHILD, str(seen), str(ready), str(exit_on)]
    wrapper = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(grace), *child],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    if argv is None:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert wrapper.poll() is None, "the wrapper died before its child was up"
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.02)
    return wrapper, seen


def _finish(wrapper: subprocess.Popen, within: float) -> str:
    try:
        out, _ = wrapper.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        wrapper.kill()
        pytest.fail(f"the wrapper did not end within {within} s of being stopped")
    return out.strip()


def test_a_missed_sigterm_is_sent_again(tmp_path):
    wrapper, seen = _start(tmp_path, exit_on=2)
    wrapper.send_signal(signal.SIGTERM)
    assert _finish(wrapper, within=4) == "None"  # stopped, not "exited by itself"
    assert seen.read_text() == "2"


def test_a_child_that_will_not_stop_is_killed_after_the_grace_period(tmp_path):
    wrapper, seen = _start(tmp_path, exit_on=0, grace=1.0)
    started = time.monotonic()
    wrapper.send_signal(signal.SIGTERM)
    assert _finish(wrapper, within=10) == "None"
    assert time.monotonic() - started >= 1.0  # it was asked first
    assert int(seen.read_text()) >= 2


def test_ctrl_c_to_the_wrapper_ends_the_child(tmp_path):
    wrapper, seen = _start(tmp_path, exit_on=1)
    wrapper.send_signal(signal.SIGINT)
    assert _finish(wrapper, within=4) == "None"
    assert seen.read_text() == "1"


def test_a_child_that_ends_by_itself_gives_its_exit_code(tmp_path):
    wrapper, _ = _start(tmp_path, 0, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    assert _finish(wrapper, within=30) == "3"
