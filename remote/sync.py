"""Ship the job and serving code to the host, and build the Python environment the jobs run in.

Both steps do nothing when nothing changed, so `fab setup` is cheap to run again:

- code: ``rsync`` over the same key and pinned host key when both ends have it, else a sha256
  comparison (``sha256sum`` on the host) and an SFTP upload of the files that differ;
- environment: ``uv venv`` + ``uv pip install --torch-backend auto`` (CPU wheels on a CPU
  instance, CUDA wheels where uv finds an NVIDIA driver), skipped while the stamp
  ``.venv/.tinycloud-stamp`` matches the requirements. ``--python PATH`` (or
  ``TINYCLOUD_PYTHON``) uses an existing interpreter instead and builds nothing;
  ``TINYCLOUD_UV`` names the uv binary on the host when it is not on PATH.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

from invoke import Exit

from facts import sha256_file
from remote import paths
from remote.runner import PYTHON_FILE, Runner, SshRunner

q = shlex.quote

# What `fab setup` ships: the job code, the serving code, the shared facts, and the empty package
# marker that makes `python -m remote.jobs.pretrain` importable without the control side.
SYNC_DIRS = ("remote/jobs", "serving")
SYNC_FILES = ("facts.py", "remote/__init__.py")
SYNC_EXCLUDES = ("__pycache__", "*.pyc", ".pytest_cache")
REQUIREMENTS_FILE = "requirements.txt"  # in the work directory on the host
ENV_STAMP = ".venv/.tinycloud-stamp"  # digest of what the environment was built from
ENV_GROUPS = ("train", "serve")  # the dependency groups the host needs (pyproject.toml)
PYTHON_VERSION = "3.12"  # what uv installs on the host when it builds the environment
UV_ON_HOST = '"$(command -v uv || echo "$HOME/.local/bin/uv")"'  # cloud-init puts uv on PATH


def local_files() -> dict[str, Path]:
    """Relative path -> file, for everything `fab setup` ships."""
    files = {rel: paths.ROOT / rel for rel in SYNC_FILES}
    for top in SYNC_DIRS:
        for dirpath, dirs, names in os.walk(paths.ROOT / top):
            dirs[:] = [d for d in dirs if not _excluded(d)]
            for n in names:
                if not _excluded(n):
                    path = Path(dirpath) / n
                    files[path.relative_to(paths.ROOT).as_posix()] = path
    return dict(sorted(files.items()))


def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in SYNC_EXCLUDES)


def sync_code(runner: Runner, method: str = "auto") -> list[str]:
    """Make the host's copy match this checkout; the paths that were sent or deleted."""
    if runner.local:
        return []  # local jobs import the checkout itself
    if method not in ("auto", "rsync", "sftp"):
        raise Exit(f"--sync {method!r}: use auto, rsync or sftp.")
    if method == "auto":
        both = shutil.which("rsync") and runner.has_command("rsync")
        method = "rsync" if both else "sftp"
    assert isinstance(runner, SshRunner)
    return rsync(runner) if method == "rsync" else sftp_sync(runner)


def rsync(runner: SshRunner) -> list[str]:
    t = runner.target
    ssh = shlex.join(t.ssh_argv("-o", "BatchMode=yes")[:-1])  # rsync appends user@host
    excludes = [f"--exclude={pat}" for pat in SYNC_EXCLUDES]
    sources = [*SYNC_FILES, *(f"{d}/" for d in SYNC_DIRS)]
    runner.run(f"mkdir -p {q(runner.base)}")
    cmd = [
        "rsync",
        "-a",
        "--relative",
        "--delete",
        "--itemize-changes",
        *excludes,
        "-e",
        ssh,
        *sources,
        f"{t.user}@{t.host}:{runner.base}/",
    ]
    proc = subprocess.run(cmd, cwd=paths.ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Exit(f"rsync to {t.host} failed: {proc.stderr.strip()}. Retry with --sync sftp.")
    changed = []
    for line in proc.stdout.splitlines():
        flags, _, path = line.partition(" ")
        if flags.startswith(("<f", ">f")) or flags == "*deleting":
            changed.append(path.strip())
    return changed


def sftp_sync(runner: SshRunner) -> list[str]:
    """Compare sha256 digests and upload only what differs; delete what the checkout lost."""
    local = {rel: sha256_file(p) for rel, p in local_files().items()}
    remote = _remote_digests(runner)
    send = [rel for rel, digest in local.items() if remote.get(rel) != digest]
    tops = tuple(f"{d}/" for d in SYNC_DIRS)
    gone = [rel for rel in remote if rel not in local and rel.startswith(tops)]
    for rel in send:
        mode = 0o755 if os.access(paths.ROOT / rel, os.X_OK) else 0o644
        runner.put_bytes((paths.ROOT / rel).read_bytes(), rel, mode)
    if gone:
        runner.sh("rm -f " + " ".join(q(g) for g in gone))
    return send + [f"deleted {g}" for g in gone]


def _remote_digests(runner: Runner) -> dict[str, str]:
    tops = " ".join(q(p) for p in (*SYNC_DIRS, *SYNC_FILES))
    r = runner.sh(
        f"find {tops} -type f ! -path '*/__pycache__/*' ! -name '*.pyc' "
        "-exec sha256sum {} + 2>/dev/null; true"
    )
    digests = {}
    for line in r.stdout.splitlines():
        digest, _, rel = line.partition("  ")
        if rel:
            digests[rel] = digest
    return digests


# --- the environment ---------------------------------------------------------------------------


def requirements() -> str:
    """The host's requirements: the train and serve groups of pyproject.toml, nothing else."""
    groups = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["dependency-groups"]

    def expand(name: str) -> list[str]:
        out: list[str] = []
        for item in groups[name]:
            out += expand(item["include-group"]) if isinstance(item, dict) else [item]
        return out

    reqs = dict.fromkeys(r for g in ENV_GROUPS for r in expand(g))
    return "".join(f"{r}\n" for r in reqs)


def ensure_env(runner: Runner, *, python: str = "", torch_backend: str = "auto") -> str:
    """Make sure the host has an interpreter with the job dependencies; what was done."""
    python = python or paths.env("PYTHON")
    if python or runner.local:
        return use_interpreter(runner, python or runner.python())
    reqs = requirements()
    stamp = hashlib.sha256(f"{torch_backend}\n{reqs}".encode()).hexdigest()
    venv_python = runner.path(".venv/bin/python")
    current = runner.read_text(ENV_STAMP)
    if (
        current
        and current.strip() == stamp
        and runner.sh(f"test -x {q(venv_python)}", warn=True).ok
    ):
        use_interpreter(runner, venv_python, check=False)
        return "environment up to date"
    runner.put_bytes(reqs.encode(), REQUIREMENTS_FILE)
    uv = q(paths.env("UV")) if paths.env("UV") else UV_ON_HOST
    r = runner.sh(
        f"{uv} venv --allow-existing --python {PYTHON_VERSION} .venv && "
        f"{uv} pip install --python .venv/bin/python --torch-backend {q(torch_backend)} "
        f"-r {REQUIREMENTS_FILE}",
        hide=False,
        warn=True,
    )
    if not r.ok:
        raise Exit(
            "building the environment failed (output above). uv comes from cloud-init on a "
            "tinycloud host; elsewhere install it (https://docs.astral.sh/uv/) or pass --python."
        )
    runner.put_bytes(f"{stamp}\n".encode(), ENV_STAMP)
    use_interpreter(runner, venv_python, check=False)
    return f"environment built (torch backend: {torch_backend})"


def use_interpreter(runner: Runner, python: str, check: bool = True) -> str:
    """Record ``python`` as the jobs' interpreter, after checking that it runs."""
    if check:
        r = runner.sh(f"{q(python)} -c 'import sys; print(sys.version.split()[0])'", warn=True)
        if not r.ok:
            raise Exit(f"--python {python}: it does not run on the host ({r.stderr.strip()}).")
    runner.put_bytes(f"{python}\n".encode(), PYTHON_FILE)
    return f"using {python} (no environment build)"
