"""The chat page's scripts under a real JS engine: their unit tests (Node's own test runner on
tests/web/js/) and ESLint on web/chat/ (scripts and style) and those tests, at the versions
package-lock.json pins. `.ci/run` installs Node.js and runs `npm ci`; elsewhere these skip, saying
which of the two is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = sorted((ROOT / "tests" / "web" / "js").glob("*.test.js"))
ESLINT = ROOT / "node_modules" / "eslint" / "bin" / "eslint.js"


def _node() -> str:
    node = shutil.which("node")
    if not node:
        pytest.skip("Node.js is not installed (apt-get install nodejs npm, then `npm ci`)")
    return node


def _eslint() -> list[str]:
    node = _node()
    if not ESLINT.exists():
        pytest.skip("ESLint is not in node_modules/: run `npm ci` at the repository root")
    return [node, str(ESLINT), "--max-warnings=0"]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def test_js_unit_tests_pass():
    assert JS_TESTS, "no tests/web/js/*.test.js"
    result = _run([_node(), "--test", "--test-reporter=tap", *map(str, JS_TESTS)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = re.findall(r"^# (tests|pass|fail|skipped|todo) (\d+)$", output, re.M)
    counts = {k: int(v) for k, v in summary}
    # Every test ran and passed: none skipped or left to do.
    assert counts.get("tests", 0) >= 40 and counts["pass"] == counts["tests"], output
    assert counts["fail"] == counts["skipped"] == counts["todo"] == 0, output


def test_eslint_passes():
    result = _run([*_eslint(), "."])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "name, source, rule",
    [
        ("probe.js", 'document.body.innerHTML = "<b>x</b>";\n', "no-restricted-properties"),
        ("probe.js", '"use strict";\nconst unused = 1;\n', "no-unused-vars"),
        ("probe.css", "a { colr: red; }\n", "css/no-invalid-properties"),
    ],
)
def test_eslint_refuses_what_it_should(name, source, rule):
    """The configuration is live for web/chat/: a markup sink, an unused name, a misspelt CSS
    property each fail the lint."""
    result = _run([*_eslint(), "--stdin", "--stdin-filename", f"web/chat/{name}"], input=source)
    assert result.returncode == 1, result.stdout + result.stderr
    assert rule in result.stdout, result.stdout
