"""Host resolution (remote/target.py) from a recorded `pulumi stack output --json` document, from
--host/--key and the environment, and the errors when there is nothing to resolve; plus the
promise that `fab --list` loads none of the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from invoke import Exit
from remote_harness import DATA, ROOT, fab_fixture, recorded_outputs  # noqa: F401

from remote.target import explicit_target, resolve


@pytest.fixture
def env(tmp_path):
    values = {
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_STACK_OUTPUTS": str(DATA / "stack-outputs.json"),
    }
    with mock.patch.dict(os.environ, values):
        for name in ("TINYCLOUD_HOST", "TINYCLOUD_TARGET", "TINYCLOUD_SSH_PORT", "TINYCLOUD_STACK"):
            os.environ.pop(name, None)
        yield tmp_path


def test_stack_outputs_give_host_key_file_and_pinned_host_key(env):
    outputs = recorded_outputs()
    t = resolve()
    assert (t.host, t.user, t.port) == (outputs["public_dns"], "ubuntu", 22)
    assert t.name == "stack-outputs" and t.from_stack
    assert t.instance_id == outputs["instance_id"] and t.region == "us-east-1"
    assert t.api_url == outputs["api_url"] and t.allowed_cidrs == ["203.0.113.7/32"]
    assert t.key_file.read_text() == outputs["private_key"]
    assert t.key_file.stat().st_mode & 0o777 == 0o600
    assert t.key_file.parent.stat().st_mode & 0o777 == 0o700
    key_type, key_b64 = outputs["host_public_key"].split()[:2]
    assert t.known_hosts.read_text().splitlines() == [
        f"{outputs['public_dns']} {key_type} {key_b64}",
        f"{outputs['public_ip']} {key_type} {key_b64}",
    ]


def test_a_non_default_ssh_port_is_pinned_in_brackets(env):
    with mock.patch.dict(os.environ, {"TINYCLOUD_SSH_PORT": "2222", "TINYCLOUD_STACK": "dev"}):
        t = resolve()
    assert t.port == 2222 and t.name == "dev"
    assert t.known_hosts.read_text().startswith(f"[{recorded_outputs()['public_dns']}]:2222 ")
    assert t.state_dir == env / "state" / "dev"


def test_ssh_command_uses_the_stack_key_and_the_pinned_file(fab, env):
    r = fab({}, "ssh")
    assert r.code == 0, r.text
    state = env / "state" / "stack-outputs"
    assert r.out.split() == [
        "ssh",
        "-i",
        str(state / "id_ed25519"),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={state / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-p",
        "22",
        f"ubuntu@{recorded_outputs()['public_dns']}",
    ]


def test_no_stack_says_run_pulumi_up_or_pass_host(fab, env, tmp_path):
    missing = {"TINYCLOUD_STACK_OUTPUTS": str(tmp_path / "nope.json")}
    r = fab(missing, "status")
    assert r.code == 1
    assert "Run `pulumi up` first, or pass --host." in r.err

    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    r = fab({"TINYCLOUD_STACK_OUTPUTS": str(empty)}, "runs")
    assert r.code == 1 and "has no outputs" in r.err and "pulumi up" in r.err


def test_without_a_recording_the_pulumi_cli_is_asked(fab, env, tmp_path):
    # A `pulumi` that fails the way the real one does with no stack selected.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pulumi"
    fake.write_text(
        '#!/bin/sh\necho "$@" >> ' + str(tmp_path / "calls") + "\n"
        "echo 'error: no stack selected; please use `pulumi stack select`' >&2\n"
        "exit 255\n"
    )
    fake.chmod(0o755)
    with mock.patch.dict(os.environ, {"PATH": f"{bin_dir}:{os.environ['PATH']}"}):
        os.environ.pop("TINYCLOUD_STACK_OUTPUTS")
        r = fab({}, "status", "--stack", "dev")
    assert r.code == 1
    assert "no stack selected" in r.err and "Run `pulumi up` first, or pass --host." in r.err
    assert (tmp_path / "calls").read_text().split() == [
        "stack",
        "output",
        "--json",
        "--show-secrets",
        "--stack",
        "dev",
    ]


def test_outputs_missing_a_key_name_it(fab, env, tmp_path):
    doc = {k: v for k, v in recorded_outputs().items() if k != "host_public_key"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    r = fab({"TINYCLOUD_STACK_OUTPUTS": str(path)}, "status")
    assert r.code == 1 and "has no host_public_key output" in r.err


def test_explicit_host_user_port_and_key(env, tmp_path):
    key = tmp_path / "id"
    key.write_text("k")
    t = explicit_target("alice@203.0.113.9:2200", key=str(key))
    assert (t.user, t.host, t.port, t.key_file) == ("alice", "203.0.113.9", 2200, key)
    assert not t.from_stack and t.outputs == {}
    with mock.patch.dict(
        os.environ,
        {
            "TINYCLOUD_HOST": "[2001:db8::5]",
            "TINYCLOUD_USER": "bob",
            "TINYCLOUD_KNOWN_HOSTS": str(tmp_path / "kh"),
        },
    ):
        t = resolve()
    assert (t.user, t.host, t.port, t.known_hosts) == ("bob", "2001:db8::5", 22, tmp_path / "kh")
    with pytest.raises(Exit, match="no such file"):
        explicit_target("203.0.113.9", key=str(tmp_path / "missing"))
    with pytest.raises(Exit, match="--target 'cloud' is not known"):
        resolve(target="cloud")


def test_fab_list_shows_every_task_and_loads_no_heavy_library():
    code = (
        "import sys\n"
        "from fabric.main import program\n"
        f"program.run(['fab', '--search-root', {str(ROOT)!r}, '--list'], exit=False)\n"
        "heavy = {'torch', 'transformers', 'boto3', 'botocore', 'jinja2', 'pulumi', 'numpy'}\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "setup",
        "train",
        "runs",
        "logs",
        "status",
        "cancel",
        "fetch",
        "serve",
        "prompt",
        "chat",
        "tunnel",
        "ssh",
        "start",
        "stop",
        "doctor",
        "notebook",
    ):
        assert f"\n  {name} " in done.stdout
    assert "LOADED []" in done.stdout


def test_fab_console_script_runs_from_the_repository_root():
    fab = Path(sys.executable).with_name("fab")
    done = subprocess.run(
        [str(fab), "--help", "train"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--args=STRING" in done.stdout and "--resume" in done.stdout


def test_a_host_that_drops_the_connection_is_tried_again_then_explained(monkeypatch, tmp_path):
    # A booting host's sshd takes the connection and resets it while cloud-init restarts it:
    # connect tries again a few times (a real socket that resets, a real paramiko client), and
    # then explains, as for any host it cannot reach. A refused port is explained at once.
    import dataclasses
    import socket
    import struct
    import threading

    from remote import runner
    from remote.target import Target

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[int] = []

    def reset_every_connection() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # an RST, not a FIN

    threading.Thread(target=reset_every_connection, daemon=True).start()
    monkeypatch.setattr(runner, "RESET_RETRY_DELAYS_S", (0.05, 0.05))  # two retries
    known = tmp_path / "known_hosts"
    known.write_text("")
    port = server.getsockname()[1]
    target = Target(name="h", host="127.0.0.1", port=port, user="ubuntu", known_hosts=known)
    with pytest.raises(Exit) as dropped:
        runner.connect(target)
    assert len(accepted) == 3  # the first try and the two retries
    assert "cannot reach ubuntu@127.0.0.1" in str(dropped.value)
    server.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = dataclasses.replace(target, port=closed.getsockname()[1])
    closed.close()
    monkeypatch.setattr(runner, "RESET_RETRY_DELAYS_S", (30.0,))  # a retry would time out
    with pytest.raises(Exit) as refused:  # nothing listens there: explained at once
        runner.connect(nobody)
    assert "connection refused" in str(refused.value)
