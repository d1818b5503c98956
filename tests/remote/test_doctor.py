"""`fab doctor` against moto's real EC2/STS server, the loopback sshd standing in for the VM, and
a stand-in Pulumi CLI (the real one is a downloaded binary, which this offline machine cannot
fetch) that answers version/whoami/stack/config as the real one does, errors included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from remote_harness import (  # noqa: F401
    fab_fixture,
    make_instance,
    moto_fixture,
    sshd_fixture,
    vm_fixture,
    write_outputs,
)

from remote.doctor import Check, Findings, quota_for, quota_line

FAKE_PULUMI = r"""#!/bin/bash
echo "$*" >>"$FAKE_PULUMI/calls"
case "$1" in
version) echo v3.272.0 ;;
whoami)
    if [ -f "$FAKE_PULUMI/logged-in" ]; then
        printf 'User: student\nOrganizations: \nBackend URL: file://~\n'
    else
        echo 'error: PULUMI_ACCESS_TOKEN must be set for login during' \
            'non-interactive CLI sessions' >&2
        exit 255
    fi ;;
stack) echo dev ;;
config)
    if [ -z "${PULUMI_CONFIG_PASSPHRASE:-}" ]; then
        echo 'error: constructing secrets manager of type "passphrase": unable to find' \
            'either `PULUMI_CONFIG_PASSPHRASE` or `PULUMI_CONFIG_PASSPHRASE_FILE` when' \
            'loading source stack "dev"' >&2
        exit 255
    fi
    echo '{"aws:region": {"value": "us-east-1", "secret": false}}' ;;
*) echo "fake pulumi: unexpected $*" >&2; exit 2 ;;
esac
"""


@pytest.fixture
def pulumi(tmp_path):
    """A directory with the stand-in `pulumi`, logged in; PATH for it."""
    folder = tmp_path / "pulumi-bin"
    folder.mkdir()
    (folder / "pulumi").write_text(FAKE_PULUMI)
    (folder / "pulumi").chmod(0o755)
    (folder / "logged-in").touch()
    return {"PATH": f"{folder}:{os.environ['PATH']}", "FAKE_PULUMI": str(folder)}


def lines(out: str) -> dict[str, str]:
    """Check name -> its line (mark and detail), plus the fix line under it if any."""
    found: dict[str, str] = {}
    last = ""
    for line in out.splitlines():
        if line[:1] in "✓✗?":
            last = line[2:26].strip()
            found[last] = line
        elif last:
            found[last] += "\n" + line.strip()
    return found


def test_a_healthy_setup_is_all_ticks(fab, vm, pulumi):
    assert fab(vm, "setup").code == 0
    env = {**vm, **pulumi, "PULUMI_CONFIG_PASSPHRASE": "secret"}
    r = fab(env, "doctor")
    assert r.code == 0, r.text
    got = lines(r.out)
    assert got["Pulumi CLI"] == "✓ Pulumi CLI               v3.272.0"
    assert got["Pulumi backend"].endswith("logged in as student at file://~")
    assert got["stack selected"].endswith(" dev") and got["passphrase"].endswith(" set")
    assert got["stack outputs"].startswith("✓") and "instance i-" in got["stack outputs"]
    assert (
        got["AWS credentials"].startswith("✓") and "account 123456789012" in got["AWS credentials"]
    )
    assert got["AWS region"].startswith("✓ AWS region               us-east-1")
    # moto answers Service Quotas for VPC only: the quota is "could not tell", with the command.
    assert got["vCPU quota"].startswith("? vCPU quota")
    assert "--quota-code L-1216C47A" in got["vCPU quota"]
    assert got["your IP allowed"].endswith("127.0.0.1 is in 127.0.0.1/32")
    assert got["key and known_hosts"].startswith("✓") and "0600" in got["key and known_hosts"]
    assert got["instance"].startswith("✓") and got["instance"].endswith("is running")
    assert got["VM reachable"].startswith("✓ VM reachable")
    assert got["VM ready"].startswith("✓ VM ready") and ".venv/bin/python" in got["VM ready"]
    assert len(got) == 13 and "✗" not in r.out


def test_each_problem_gets_its_exact_fix(fab, vm, moto, pulumi, tmp_path):
    stopped = write_outputs(
        tmp_path / "dev.json",
        **{
            **__import__("json").loads(Path(vm["TINYCLOUD_STACK_OUTPUTS"]).read_text()),
            "instance_id": make_instance(moto, "stopped"),
        },
    )
    env = {
        **vm,
        **pulumi,
        "TINYCLOUD_STACK_OUTPUTS": str(stopped),
        "TINYCLOUD_CURRENT_IP": "198.51.100.23",
    }
    r = fab(env, "doctor")
    assert r.code == 1
    assert "3 check(s) failed: fix the first ✗" in r.err
    got = lines(r.out)
    assert got["passphrase"].startswith("✗ passphrase               PULUMI_CONFIG_PASSPHRASE is")
    assert "fix: export PULUMI_CONFIG_PASSPHRASE='the one you chose" in got["passphrase"]
    assert "198.51.100.23 is not in 127.0.0.1/32" in got["your IP allowed"]
    assert (
        "fix: pulumi config set --path 'tinycloud:allowedCidrs[0]' 198.51.100.23/32 && pulumi up"
        in got["your IP allowed"]
    )
    assert got["instance"].startswith("✗") and got["instance"].endswith("fix: fab start")
    assert got["VM reachable"] == "✗ VM reachable             not checked: needs a running instance"

    (Path(pulumi["FAKE_PULUMI"]) / "logged-in").unlink()
    r = fab(env, "doctor")
    got = lines(r.out)
    assert "not logged in (PULUMI_ACCESS_TOKEN must be set" in got["Pulumi backend"]
    assert "fix: pulumi login --local" in got["Pulumi backend"]
    assert got["stack selected"].endswith("not checked: needs the Pulumi backend")


def test_no_cli_and_no_credentials(fab, tmp_path, sshd):
    outputs = write_outputs(tmp_path / "dev.json")
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {
        "PATH": str(bare),  # no pulumi (and nothing else: doctor needs no other tool here)
        "TINYCLOUD_STACK_OUTPUTS": str(outputs),
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_CURRENT_IP": "203.0.113.7",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        assert name not in os.environ, f"{name} is set in the test environment"
    r = fab(env, "doctor")
    assert r.code == 1
    got = lines(r.out)
    assert "fix: curl -fsSL https://get.pulumi.com | sh" in got["Pulumi CLI"]
    assert got["AWS credentials"].startswith("✗ AWS credentials          none found")
    assert "fix: aws configure" in got["AWS credentials"]
    assert got["vCPU quota"].endswith("not checked: needs AWS credentials and a region")
    assert got["your IP allowed"].endswith("203.0.113.7 is in 203.0.113.7/32")


def test_host_mode_checks_the_key_file_openssh_would_refuse(fab, sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_public_key}\n")
    key = tmp_path / "id"
    shutil.copy(sshd.client_key, key)
    key.chmod(0o644)
    env = {
        "TINYCLOUD_HOST": f"{sshd.user}@127.0.0.1:{sshd.port}",
        "TINYCLOUD_KEY": str(key),
        "TINYCLOUD_KNOWN_HOSTS": str(known),
        "TINYCLOUD_HOME": str(tmp_path / "state"),
        "TINYCLOUD_REMOTE_DIR": sshd.remote_dir,
    }
    r = fab(env, "doctor")
    got = lines(r.out)
    assert set(got) == {"key and known_hosts", "VM reachable", "VM ready"}, r.out
    assert f"{key} is 644, readable by others" in got["key and known_hosts"]
    assert f"fix: chmod 600 {key}" in got["key and known_hosts"]
    assert got["VM reachable"].startswith("✓")
    key.chmod(0o600)
    known.write_text("")
    r = fab(env, "doctor")
    got = lines(r.out)
    assert "has no key for 127.0.0.1" in got["key and known_hosts"]
    assert "ssh-keyscan -p" in got["key and known_hosts"]
    assert "never trusts a host key on first use" in got["VM reachable"]


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("m5.large", "L-1216C47A"),
        ("t3.large", "L-1216C47A"),
        ("g4dn.xlarge", "L-DB2E81BA"),
        ("gr6.4xlarge", "L-DB2E81BA"),
        ("p5.48xlarge", "L-417A185B"),
        ("inf2.xlarge", "L-1945791B"),
        ("trn1.2xlarge", "L-2C3B7624"),
        ("x2idn.16xlarge", "L-7295265B"),
    ],
)
def test_each_family_counts_against_its_quota(kind, code):
    assert quota_for(kind)[0] == code


def test_a_quota_below_the_need_says_how_to_ask_for_more():
    """The shape AWS answers in; a new account's GPU quota is 0."""
    f = Findings()
    quota_line(f, "g4dn.xlarge", 4, 0.0, "L-DB2E81BA", "G and VT")
    [check] = f.checks
    assert check.ok is False
    assert (
        "g4dn.xlarge needs 4 vCPUs; 'Running On-Demand G and VT instances' allows 0" in check.detail
    )
    assert "--quota-code L-DB2E81BA --desired-value 4" in check.fix
    quota_line(f, "m5.large", 2, 32.0, *quota_for("m5.large"))
    assert f.checks[-1].ok is True
    assert Check("x", None, "y").render().startswith("? x")
