"""The suite's own scheduling: the files conftest.py starts first are files of this suite."""

from __future__ import annotations

from conftest import LONGEST_FIRST, ROOT


def test_the_files_started_first_exist_once_each():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"renamed or removed? update LONGEST_FIRST in tests/conftest.py: {missing}"
