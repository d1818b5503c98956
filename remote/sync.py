"""Ship the job and serving code to the host, and build the Python environment the jobs run in.

Both steps do nothing when nothing changed, so `fab setup` is cheap to run again:

- code: ``rsync`` over the same key and pinned host key when both ends have it, else a sha256
  comparison (``sha256sum`` on the host) and an SFTP upload of the files that differ;
- environment: exactly the versions uv.lock pins for the train and serve groups (``uv export``
  here, so the host needs neither the project nor the lock), installed with ``uv pip install
  --torch-backend auto`` into a venv on the host's own python3: CPU wheels on a CPU instance,
  CUDA wheels where uv finds an NVIDIA driver, torch at its locked version either way
  (``--torch-backend pypi``: PyPI's build, as locked). ``remote.jobs.lockcheck`` then checks
  every pin on the host. Skipped while the stamp ``.venv/.tinycloud-stamp`` matches; any change
  (uv.lock, backend, trackers, the host's Python) rebuilds it from scratch. ``--python PATH``
  (or ``TINYCLOUD_PYTHON``) uses an existing interpreter instead and builds nothing;
  ``TINYCLOUD_UV`` names the uv binary on the host when it is not on PATH.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

from invoke import Exit

from remote import settings
from remote.runner import Runner, SshRunner

q = shlex.quote
UV_ON_HOST = '"$(command -v uv || echo "$HOME/.local/bin/uv")"'  # cloud-init puts uv on PATH


def local_files() -> dict[str, Path]:
    """Relative path -> file, for everything `fab setup` ships."""
    files = {rel: settings.ROOT / rel for rel in settings.SYNC_FILES}
    for top in settings.SYNC_DIRS:
        for dirpath, dirs, names in os.walk(settings.ROOT / top):
            dirs[:] = [d for d in dirs if not _excluded(d)]
            for n in names:
                if not _excluded(n):
                    path = Path(dirpath) / n
                    files[path.relative_to(settings.ROOT).as_posix()] = path
    return dict(sorted(files.items()))


def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in settings.SYNC_EXCLUDES)


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
    excludes = [f"--exclude={pat}" for pat in settings.SYNC_EXCLUDES]
    sources = [*settings.SYNC_FILES, *(f"{d}/" for d in settings.SYNC_DIRS)]
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
    proc = subprocess.run(cmd, cwd=settings.ROOT, capture_output=True, text=True)
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
    local = {rel: _sha256(p) for rel, p in local_files().items()}
    remote = _remote_digests(runner)
    send = [rel for rel, digest in local.items() if remote.get(rel) != digest]
    tops = tuple(f"{d}/" for d in settings.SYNC_DIRS)
    gone = [rel for rel in remote if rel not in local and rel.startswith(tops)]
    for rel in send:
        mode = 0o755 if os.access(settings.ROOT / rel, os.X_OK) else 0o644
        runner.put_bytes((settings.ROOT / rel).read_bytes(), rel, mode)
    if gone:
        runner.sh("rm -f " + " ".join(q(g) for g in gone))
    return send + [f"deleted {g}" for g in gone]


def _remote_digests(runner: Runner) -> dict[str, str]:
    tops = " ".join(q(p) for p in (*settings.SYNC_DIRS, *settings.SYNC_FILES))
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the environment ---------------------------------------------------------------------------

ENV_GROUPS = ("train", "serve")  # the dependency groups every host needs (pyproject.toml)
TRACKERS = ("tensorboard", "mlflow", "wandb")  # optional groups: `fab setup --track NAME`
PYPI = "pypi"  # --torch-backend pypi: torch exactly as uv.lock has it (PyPI's CUDA build)
# torch's CUDA runtime on Linux: uv.lock holds PyPI's, a --torch-backend build brings its own.
TORCH_RUNTIME = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def requested_trackers(runner: Runner, track: str) -> tuple[str, ...]:
    """--track a,b (or ``none``); without it, what an earlier `fab setup --track` added."""
    text = track if track else (runner.read_text(settings.TRACK_FILE) or "")
    names = tuple(dict.fromkeys(n.strip() for n in text.replace("\n", ",").split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise Exit(f"--track {','.join(unknown)}: choose from {', '.join(TRACKERS)} (or none).")
    return names


def locked_requirements(groups: tuple[str, ...], torch_backend: str) -> str:
    """The host's requirements, pinned as uv.lock pins them (``uv export``), with hashes.

    With a --torch-backend other than ``pypi``, torch keeps its locked version but loses its
    PyPI hashes (the backend's build is another file), and torch's CUDA runtime is left to
    that build's own dependencies.
    """
    argv = ["uv", "export", "--frozen", "--format", "requirements.txt", "--no-emit-project"]
    argv += ["--no-header", "--no-annotate", *(f"--only-group={g}" for g in groups)]
    try:
        done = subprocess.run(argv, cwd=settings.ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        raise Exit(
            "`fab setup` reads uv.lock with uv, which is not on PATH here. Install it "
            "(https://docs.astral.sh/uv/) and run `uv run fab setup`."
        ) from None
    if done.returncode != 0:
        raise Exit(f"uv export could not read uv.lock: {done.stderr.strip()}")
    if torch_backend == PYPI:
        return done.stdout
    kept = []
    for entry in _entries(done.stdout):
        name = re.split(r"[=<>!~;\s\[]", entry, maxsplit=1)[0].lower()
        if TORCH_RUNTIME.match(name):
            continue
        kept.append(_without_hashes(entry) if name == "torch" else entry)
    return "".join(kept)


def _entries(text: str) -> list[str]:
    """requirements.txt entries, each with its ``\\``-continued hash lines."""
    entries: list[str] = []
    for line in text.splitlines(keepends=True):
        if entries and entries[-1].rstrip().endswith("\\"):
            entries[-1] += line
        elif line.strip() and not line.lstrip().startswith("#"):
            entries.append(line)
    return entries


def _without_hashes(entry: str) -> str:
    return entry.split("\\", 1)[0].rstrip() + "\n"


def host_python(runner: Runner) -> tuple[str, str]:
    """The host's own python3 and its version, checked against requires-python: the
    environment is built on it, never on a downloaded interpreter."""
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((settings.ROOT / "pyproject.toml").read_text())["project"]
    wanted = SpecifierSet(project["requires-python"])
    r = runner.run(
        "command -v python3 && python3 -c 'import platform; print(platform.python_version())'",
        warn=True,
    )
    lines = r.stdout.split()
    if not r.ok or len(lines) != 2:
        raise Exit("the host has no python3. On Ubuntu: sudo apt-get install python3.")
    path, version = lines
    if version not in wanted:
        raise Exit(
            f"the host's python3 is {version} ({path}); tinycloud needs Python {wanted}. "
            "Use an image whose python3 fits (Ubuntu 24.04: 3.12), or pass --python."
        )
    return path, version


def ensure_env(
    runner: Runner, *, python: str = "", torch_backend: str = "auto", track: str = ""
) -> str:
    """Make sure the host has an interpreter with the job dependencies; what was done.

    The environment holds exactly what uv.lock pins for the train and serve groups (and the
    trackers asked for), on the host's own python3; it is rebuilt from scratch whenever that
    set changes (a new uv.lock, another backend, another tracker), and checked afterwards.
    """
    python = python or settings.env("PYTHON")
    if python or runner.local:
        return use_interpreter(runner, python or runner.python())
    trackers = requested_trackers(runner, track)
    reqs = locked_requirements((*ENV_GROUPS, *trackers), torch_backend)
    base, version = host_python(runner)
    stamp = hashlib.sha256(f"{torch_backend}\n{base} {version}\n{reqs}".encode()).hexdigest()
    venv_python = runner.path(".venv/bin/python")
    runner.put_bytes("".join(f"{t}\n" for t in trackers).encode(), settings.TRACK_FILE)
    current = runner.read_text(settings.ENV_STAMP)
    if (
        current
        and current.strip() == stamp
        and runner.sh(f"test -x {q(venv_python)}", warn=True).ok
    ):
        use_interpreter(runner, venv_python, check=False)
        return f"environment up to date (uv.lock, Python {version}{_with(trackers)})"
    runner.put_bytes(reqs.encode(), settings.REQUIREMENTS_FILE)
    uv = q(settings.env("UV")) if settings.env("UV") else UV_ON_HOST
    backend = "" if torch_backend == PYPI else f"--torch-backend {q(torch_backend)} "
    r = runner.sh(
        f"rm -rf .venv && {uv} venv --no-python-downloads --python {q(base)} .venv && "
        f"{uv} pip install --python .venv/bin/python {backend}-r {settings.REQUIREMENTS_FILE}",
        hide=False,
        warn=True,
    )
    if not r.ok:
        raise Exit(
            "building the environment failed (output above). uv comes from cloud-init on a "
            "tinycloud host; elsewhere install it (https://docs.astral.sh/uv/) or pass --python."
        )
    check = runner.sh(
        f"{q(venv_python)} -m remote.jobs.lockcheck {settings.REQUIREMENTS_FILE}", warn=True
    )
    if not check.ok:
        raise Exit(f"the environment does not match uv.lock:\n{check.stdout}{check.stderr}")
    print(check.stdout.strip())
    runner.put_bytes(f"{stamp}\n".encode(), settings.ENV_STAMP)
    use_interpreter(runner, venv_python, check=False)
    return (
        f"environment built from uv.lock (Python {version}, "
        f"torch backend: {torch_backend}{_with(trackers)})"
    )


def _with(trackers: tuple[str, ...]) -> str:
    return f", with {', '.join(trackers)}" if trackers else ""


def use_interpreter(runner: Runner, python: str, check: bool = True) -> str:
    """Record ``python`` as the jobs' interpreter, after checking that it runs."""
    if check:
        r = runner.sh(f"{q(python)} -c 'import sys; print(sys.version.split()[0])'", warn=True)
        if not r.ok:
            raise Exit(f"--python {python}: it does not run on the host ({r.stderr.strip()}).")
    runner.put_bytes(f"{python}\n".encode(), settings.PYTHON_FILE)
    return f"using {python} (no environment build)"
