"""`fab notebook` and the course notebook, for real.

- notebooks/course.ipynb is executed cell by cell by nbclient in a real kernel, offline, at
  tiny settings (its own parameters, from the environment): pretrain, two fine-tunes, the
  comparison, the evaluation and the server all run.
- `fab notebook` starts real JupyterLab on the stand-in VM (loopback sshd) and reaches it
  through its SSH tunnel with the token; Ctrl-C (SIGTERM) ends the tunnel, not the server;
  `--stop` ends the server. The same on `--target local`, without a tunnel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from remote_harness import ROOT, fab_cli, fab_fixture, moto_fixture, sshd_fixture, vm_fixture  # noqa: F401

NOTEBOOK = ROOT / "notebooks" / "course.ipynb"


def get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # refused: nothing listens (yet, or any more)
        return 0


def wait_for(what: str, check, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


# --- the course notebook, executed ------------------------------------------------------------


@pytest.mark.slow
def test_course_notebook_runs_offline_cell_by_cell(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    runs = tmp_path / "runs"
    for name, value in {
        "TINYCLOUD_NOTEBOOK_TINY": "1",
        "TINYCLOUD_NOTEBOOK_SCALE": "0.02",
        "TINYCLOUD_NOTEBOOK_LIMITS": "40,80",
        "TINYCLOUD_NOTEBOOK_MAX_NEW_TOKENS": "8",
        "TINYCLOUD_RUNS": str(runs),
        "PYTHONPATH": str(ROOT),  # what `fab notebook` gives the kernel: the jobs importable
    }.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    for name in ("course-pretrain", "course-ft-40", "course-ft-80", "course-evaluate"):
        assert json.loads((runs / name / "run.json").read_text())["status"] == "completed", name
    assert (runs / "course-evaluate" / "report.md").read_text().count("|") > 10
    assert (runs / "compare_course.png").read_bytes()[:4] == b"\x89PNG"
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "course-ft-40: completed after" in text and "course-ft-80" in text
    assert "Q: Name three colors.\nA: " in text
    assert "server stopped" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the comparison plot was not shown"


def test_the_notebook_is_committed_clean():
    """No outputs or execution counts in the repository's copy: it is run, not read."""
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    parts = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    for part in ("Part 1", "Part 2", "Part 3", "Part 4"):
        assert any(part in "".join(c["source"]) for c in parts), part


# --- `fab notebook` through the stand-in VM ----------------------------------------------------


def read_url(proc: subprocess.Popen) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("open http://"):
            return line.split()[1]
    raise AssertionError(f"fab notebook printed no URL: {''.join(seen)}")


@pytest.mark.slow
def test_fab_notebook_tunnels_to_jupyterlab_that_outlives_the_tunnel(fab, vm, sshd):
    assert fab(vm, "setup").code == 0
    port, local = free_port(), free_port()
    proc = fab_cli(vm, "notebook", "--port", str(port), "--local-port", str(local))
    try:
        url = read_url(proc)
        token = url.split("token=")[1]
        assert url.startswith(f"http://127.0.0.1:{local}/lab/tree/notebooks/course.ipynb?token=")
        api = f"http://127.0.0.1:{local}/api/status"
        wait_for("the tunnel", lambda: get(api, token) == 200, timeout=60)
        assert get(api) == 403, "the server must want its token"
    finally:
        proc.send_signal(signal.SIGTERM)  # what Ctrl-C does to the tunnel
        proc.wait(30)
    work = sshd.work
    assert (work / "notebooks" / "course.ipynb").read_bytes() == NOTEBOOK.read_bytes()
    env_file = work / "notebook" / "notebook.env"
    assert env_file.stat().st_mode & 0o777 == 0o600 and token in env_file.read_text()
    server = int((work / "notebook" / "server.pid").read_text())
    cmdline = Path(f"/proc/{server}/cmdline").read_bytes()
    assert b"jupyterlab" in cmdline and token.encode() not in cmdline
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert f"PYTHONPATH={work}".encode() in environ  # the kernel imports the jobs
    assert f"TINYCLOUD_RUNS={work / 'runs'}".encode() in environ
    # The tunnel is gone; the server is not (on the "VM", its own port answers).
    wait_for("the tunnel to close", lambda: get(f"http://127.0.0.1:{local}/api") != 200, 20)
    assert get(f"http://127.0.0.1:{port}/api/status", token) == 200

    edited = work / "notebooks" / "course.ipynb"
    edited.write_text(edited.read_text().replace("Part 1", "Part One"))
    # No --local-port: the server's own port is taken here (the stand-in VM is this machine,
    # as a laptop's own Jupyter may hold 8888), so the tunnel takes the next free one.
    again = fab_cli(vm, "notebook", "--port", str(port))
    try:
        lines = [next(again.stdout) for _ in range(2)]
        assert lines[0].startswith("JupyterLab already running"), lines
        moved = int(lines[1].split("127.0.0.1:")[1].split("/")[0])
        assert moved != port
        status = f"http://127.0.0.1:{moved}/api/status"
        wait_for("the second tunnel", lambda: get(status, token) == 200, timeout=60)
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
    assert "Part One" in edited.read_text(), "a student's edits are never overwritten"

    stopped = fab(vm, "notebook", "--stop")
    assert stopped.code == 0 and "stopped the notebook server" in stopped.out
    wait_for("the server to exit", lambda: not Path(f"/proc/{server}").exists(), 30)
    assert "no notebook server ran" in fab(vm, "notebook", "--stop").out


@pytest.mark.slow
def test_fab_notebook_on_this_machine(fab, tmp_path):
    env = {"TINYCLOUD_TARGET": "local", "TINYCLOUD_HOME": str(tmp_path / "state")}
    port = free_port()
    try:
        r = fab(env, "notebook", "--port", str(port))
        assert r.code == 0, r.text
        url = next(x.split()[1] for x in r.out.splitlines() if x.startswith("open "))
        token = url.split("token=")[1]
        assert url.startswith(f"http://127.0.0.1:{port}/lab/tree/notebooks/course.ipynb?token=")
        assert get(f"http://127.0.0.1:{port}/api/status", token) == 200
        work = tmp_path / "state" / "local" / "work"
        assert (work / "notebooks" / "course.ipynb").is_file()
        environ = Path(f"/proc/{int((work / 'notebook' / 'server.pid').read_text())}/environ")
        assert b"TINYCLOUD_COST_PER_HOUR=0.0" in environ.read_bytes().split(b"\0")
    finally:
        fab(env, "notebook", "--stop")
    assert get(f"http://127.0.0.1:{port}/api") != 200


def test_without_jupyterlab_the_host_gets_told_which_group(fab, tmp_path):
    plain = "/usr/bin/python3"
    probe = subprocess.run([plain, "-c", "import jupyterlab"], capture_output=True)
    if not os.path.exists(plain) or probe.returncode == 0:
        pytest.skip("needs a system python3 without jupyterlab")
    env = {"TINYCLOUD_TARGET": "local", "TINYCLOUD_HOME": str(tmp_path / "state")}
    work = tmp_path / "state" / "local" / "work"
    work.mkdir(parents=True)
    (work / ".python").write_text(plain + "\n")  # what `fab setup --python` records
    r = fab(env, "notebook")
    assert r.code == 1
    assert "JupyterLab is not installed in the host's job environment" in r.err
    assert "`notebook` dependency group" in r.err
    assert "`fab setup --groups notebook`" in r.err
