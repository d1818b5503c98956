"""Download a finished run, every file checked against the sha256 manifest the job wrote.

    fab fetch my-finetune        # -> runs/my-finetune/{model/, metrics.jsonl, loss.png, ...}

Resumable: a file already here with the right digest is skipped, so an interrupted fetch just
runs again. A download whose digest is wrong is fetched once more; if it is still wrong the copy
on the host is damaged (or was changed after the run finished) and the fetch fails saying which
files. ``run.json`` and ``train.log`` come along unverified (they are not in the manifest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from invoke import Exit

from facts import MANIFEST, RUN_JSON, RUNS_DIR_NAME, TRAIN_LOG, sha256_file
from remote.runner import Runner

EXTRAS = (RUN_JSON, TRAIN_LOG)  # useful beside the model, but never in the manifest


@dataclass
class FetchReport:
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)  # first download was wrong, second right
    repaired: list[str] = field(default_factory=list)  # a local copy that did not match
    corrupted: list[str] = field(default_factory=list)  # wrong twice: the host's copy is bad

    def summary(self) -> str:
        parts = [f"{len(self.fetched)} fetched", f"{len(self.skipped)} already here"]
        if self.repaired:
            parts.append(f"{len(self.repaired)} local copies repaired")
        if self.corrupted:
            parts.append(f"{len(self.corrupted)} CORRUPTED")
        return ", ".join(parts)


def parse_manifest(text: str) -> list[tuple[str, str]]:
    """(sha256, relative path) rows; a path that would escape the run directory is refused."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        path = PurePosixPath(rel.strip())
        if len(digest) != 64 or not rel or path.is_absolute() or ".." in path.parts:
            raise Exit(f"the run's manifest has a bad line {line[:80]!r}; re-run the job.")
        rows.append((digest.lower(), path.as_posix()))
    return rows


def fetch_run(runner: Runner, name: str, dest: Path) -> FetchReport:
    src = f"{RUNS_DIR_NAME}/{name}"
    manifest = runner.read_text(f"{src}/{MANIFEST}")
    if manifest is None:
        raise Exit(
            f"run {name!r} has no {MANIFEST} on the host: it has not finished (or it failed). "
            "`fab status` shows where it is."
        )
    dest.mkdir(parents=True, exist_ok=True)
    report = FetchReport()
    for digest, rel in parse_manifest(manifest):
        _fetch_one(runner, f"{src}/{rel}", dest / rel, digest, rel, report)
    (dest / MANIFEST).write_text(manifest)
    for extra in EXTRAS:
        if runner.read_text(f"{src}/{extra}") is not None:
            runner.get(f"{src}/{extra}", dest / extra)
    return report


def _fetch_one(
    runner: Runner, remote: str, local: Path, digest: str, rel: str, report: FetchReport
) -> None:
    had_copy = local.exists()
    if had_copy and sha256_file(local) == digest:
        report.skipped.append(rel)
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f".{local.name}.part")
    for attempt in (1, 2):
        runner.get(remote, part)
        if sha256_file(part) == digest:
            os.replace(part, local)
            (report.repaired if had_copy else report.fetched).append(rel)
            if attempt == 2:
                report.refetched.append(rel)
            return
    part.unlink(missing_ok=True)
    report.corrupted.append(rel)
