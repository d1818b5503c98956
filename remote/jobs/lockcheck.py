"""Check that this environment holds exactly the versions a requirements file pins.

    python -m remote.jobs.lockcheck requirements.txt

`fab setup` runs it on the host right after building the environment from uv.lock's pins, so
the jobs never run on a package mix the lock file did not test. A pin whose marker does not
apply here (another Python, another platform) is skipped; a local version label is ignored
(``torch==2.15.0`` is met by ``2.15.0+cpu`` from the CPU index). Exit 0 with one summary line,
or 1 listing every package that is missing or at another version.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def pins(text: str) -> list[Requirement]:
    """The requirements in a ``uv export`` file (its hash lines are dropped)."""
    logical = text.replace("\\\n", " ")
    out = []
    for line in logical.splitlines():
        line = line.split(" --hash", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            out.append(Requirement(line))
    return out


def mismatches(requirements: list[Requirement]) -> tuple[list[str], int]:
    """(what is wrong, how many pins apply here)."""
    wrong, applied = [], 0
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        applied += 1
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{req.name}: not installed (uv.lock pins {req.specifier})")
            continue
        if not req.specifier.contains(have, prereleases=True):
            wrong.append(f"{req.name}: {have} installed, uv.lock pins {req.specifier}")
    return wrong, applied


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m remote.jobs.lockcheck REQUIREMENTS", file=sys.stderr)
        return 2
    wrong, applied = mismatches(pins(Path(args[0]).read_text()))
    if wrong:
        print("\n".join(wrong))
        return 1
    torch = metadata.version("torch") if _installed("torch") else "absent"
    py = ".".join(map(str, sys.version_info[:3]))
    print(
        f"uv.lock: all {applied} pinned packages installed as locked (torch {torch}, Python {py})"
    )
    return 0


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
