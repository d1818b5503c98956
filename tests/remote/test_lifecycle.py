"""`fab start` / `fab stop` and the stopped-host error, against moto's real EC2 server.

The stack outputs name a moto instance; their host is a loopback port nobody listens on, so an
SSH attempt fails at once and `fab` has to explain why from what AWS and the stack say.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from unittest import mock

import pytest
from conftest import free_port
from remote_harness import fab_fixture, make_instance, moto_fixture, write_outputs  # noqa: F401


def _state(aws_env: dict[str, str], iid: str) -> str:
    import boto3

    with mock.patch.dict(os.environ, aws_env):
        ec2 = boto3.client("ec2", region_name="us-east-1")
        return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0][
            "State"
        ]["Name"]


@pytest.fixture
def stack(moto, tmp_path):
    """Env for `fab` whose stack is a running moto instance at an unreachable address."""
    iid = make_instance(moto)
    outputs = write_outputs(
        tmp_path / "dev.json",
        instance_id=iid,
        region="us-east-1",
        public_dns="127.0.0.1",
        public_ip="127.0.0.1",
    )
    env = {
        **moto,
        "TINYCLOUD_STACK_OUTPUTS": str(outputs),
        "TINYCLOUD_SSH_PORT": str(free_port()),  # nothing listens: refused at once
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_CURRENT_IP": "203.0.113.7",
    }
    return env, iid


def test_stop_then_every_host_task_says_run_fab_start_then_start(fab, stack):
    env, iid = stack
    # What an earlier `fab status` kept of the VM's boot log: one earlier boot of two hours.
    cache = Path(env["TINYCLOUD_HOME"]) / "dev" / "boots.json"
    cache.parent.mkdir(parents=True)
    now = time.time()
    cache.write_text(json.dumps({"boots": [[now - 30 * 3600, now - 28 * 3600]]}))
    stopped = fab(env, "stop")
    assert stopped.code == 0, stopped.text
    assert f"{iid} is stopped" in stopped.out
    assert _state(env, iid) == "stopped"
    # The VM did not answer over SSH, so EC2's launch time and the kept boot log speak.
    assert "(could not read the VM's boot log: cannot reach" in stopped.out
    assert "this start: 0:00:" in stopped.out and " running ≈ " in stopped.out
    spent = next(x for x in stopped.out.splitlines() if x.startswith("the stack so far: "))
    assert spent.endswith("(from the last boot log fab read)"), spent
    assert "stopped, it costs about $0.016/hour (volume and address)" in stopped.out

    status = fab(env, "status")
    assert status.code == 1
    assert f"Instance {iid} is stopped: run `fab start`" in status.err

    setup = fab(env, "setup")
    assert setup.code == 1
    assert f"instance {iid} is stopped: run `fab start`" in setup.err

    started = fab(env, "start")
    assert started.code == 0, started.text
    assert f"{iid} is running at" in started.out
    assert _state(env, iid) == "running"

    again = fab(env, "stop")
    assert again.code == 0 and _state(env, iid) == "stopped"
    assert fab(env, "stop").code == 0, "stopping a stopped instance is not an error"


def test_changed_operator_ip_is_explained_with_the_fix(fab, stack):
    env, _ = stack
    moved = {**env, "TINYCLOUD_CURRENT_IP": "198.51.100.23"}
    r = fab(moved, "runs")
    assert r.code == 1
    assert "admits SSH only from 203.0.113.7/32" in r.err
    assert "public IP is now 198.51.100.23" in r.err
    assert "pulumi config set --path 'tinycloud:allowedCidrs[0]' 198.51.100.23/32" in r.err
    assert "pulumi up" in r.err


def test_an_instance_aws_does_not_know_is_reported(fab, moto, tmp_path):
    outputs = write_outputs(
        tmp_path / "gone.json", instance_id="i-0123456789abcdef0", region="us-east-1"
    )
    env = {**moto, "TINYCLOUD_STACK_OUTPUTS": str(outputs), "TINYCLOUD_HOME": str(tmp_path)}
    r = fab(env, "start")
    assert r.code == 1
    assert "instance i-0123456789abcdef0 not found. Run `pulumi up`" in r.err


def test_the_infra_setting_named_in_the_ip_fix_exists():
    import ast

    source = (Path(__file__).resolve().parents[2] / "infra" / "config.py").read_text()
    tree = ast.parse(source)
    defaults = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "DEFAULTS"
    )
    keys = {k.value for k in defaults.value.keys}
    assert "allowedCidrs" in keys
