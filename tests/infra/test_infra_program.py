"""Policy tests of infra/__main__.py, run for real under Pulumi's mock runtime.

What `pulumi up` would create is asserted on the inputs the program gives each resource:
nothing open to the world unless asked, the volume as asked, IMDSv2, the GPU switch, the EIP,
tags, and every output of contract 1 with the private key secret.
"""

from __future__ import annotations

import ipaddress

import pytest
import yaml
from infra_harness import DLAMI_AMI, EIP_ADDRESS, UBUNTU_AMI, run_program

import infra.myip
from infra import amis, cloud_init
from infra.config import ConfigError

OPERATOR = "198.51.100.7/32"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INSTANCE = "aws:ec2/instance:Instance"
CONTRACT_OUTPUTS = {
    "instance_id",
    "public_dns",
    "public_ip",
    "region",
    "instance_type",
    "ssh_user",
    "api_port",
    "api_url",
    "private_key",
    "host_public_key",
    "allowed_cidrs",
    "cost_per_hour",
}
UNTAGGABLE = {"aws:ec2/eipAssociation:EipAssociation"}


def _ingress_sources(program) -> set[tuple[int, str]]:
    rules = program.mocks.of_type(INGRESS)
    return {(r.inputs["fromPort"], r.inputs.get("cidrIpv4") or r.inputs["cidrIpv6"]) for r in rules}


@pytest.fixture(scope="module")
def default_program():
    return run_program({"allowedCidrs": [OPERATOR]})


def test_ingress_is_ssh_and_api_from_the_operator_only(default_program):
    rules = default_program.mocks.of_type(INGRESS)
    assert _ingress_sources(default_program) == {(22, OPERATOR), (8080, OPERATOR)}
    for rule in rules:
        assert rule.inputs["ipProtocol"] == "tcp"
        assert rule.inputs["fromPort"] == rule.inputs["toPort"]
        assert rule.inputs["securityGroupId"].startswith("sg-")


def test_egress_is_open_for_apt_pip_and_docker(default_program):
    egress = {
        (r.inputs["ipProtocol"], r.inputs.get("cidrIpv4") or r.inputs.get("cidrIpv6"))
        for r in default_program.mocks.of_type(EGRESS)
    }
    assert egress == {("-1", "0.0.0.0/0"), ("-1", "::/0")}


def test_default_cidr_is_the_looked_up_address(monkeypatch):
    monkeypatch.setattr(infra.myip, "current_public_ip", lambda: "192.0.2.44")
    program = run_program()
    assert _ingress_sources(program) == {(22, "192.0.2.44/32"), (8080, "192.0.2.44/32")}
    assert program.outputs["allowed_cidrs"] == ["192.0.2.44/32"]


def test_failed_ip_lookup_says_which_command_to_run(monkeypatch):
    def offline() -> str:
        raise infra.myip.IpLookupError(
            "https://checkip.amazonaws.com could not be reached (timed out; timeout 5s)"
        )

    monkeypatch.setattr(infra.myip, "current_public_ip", offline)
    with pytest.raises(ConfigError) as err:
        run_program()
    assert "could not be reached (timed out; timeout 5s)" in str(err.value)
    assert "pulumi config set --path 'tinycloud:allowedCidrs[0]' 203.0.113.7/32" in str(err.value)


@pytest.mark.parametrize("world", ["0.0.0.0/0", "::/0", "0.0.0.0/1"])
def test_world_cidrs_are_refused_without_the_setting(world):
    with pytest.raises(ConfigError, match="anyone on the internet") as err:
        run_program({"allowedCidrs": [OPERATOR, world]})
    assert "pulumi config set tinycloud:openToTheWorld true" in str(err.value)


def test_open_to_the_world_works_only_when_enabled():
    program = run_program({"allowedCidrs": ["0.0.0.0/0", "::/0"], "openToTheWorld": True})
    assert _ingress_sources(program) == {
        (22, "0.0.0.0/0"),
        (8080, "0.0.0.0/0"),
        (22, "::/0"),
        (8080, "::/0"),
    }
    alone = run_program({"openToTheWorld": True})  # no CIDRs given: the world, no look-up
    assert _ingress_sources(alone) == {(22, "0.0.0.0/0"), (8080, "0.0.0.0/0")}


def test_no_ingress_rule_is_world_open_by_default(default_program):
    for _, cidr in _ingress_sources(default_program):
        assert ipaddress.ip_network(cidr).prefixlen >= 8


def test_root_volume_is_100gb_gp3_encrypted_and_kept(default_program):
    root = default_program.mocks.one(INSTANCE).inputs["rootBlockDevice"]
    assert root["volumeSize"] == 100
    assert root["volumeType"] == "gp3"
    assert root["encrypted"] is True
    assert root["deleteOnTermination"] is False


def test_volume_size_and_deletion_follow_config():
    program = run_program(
        {"allowedCidrs": [OPERATOR], "volumeSizeGb": 250, "deleteVolumeOnDestroy": True}
    )
    root = program.mocks.one(INSTANCE).inputs["rootBlockDevice"]
    assert (root["volumeSize"], root["deleteOnTermination"]) == (250, True)
    assert program.outputs["cost_per_hour"]["volume_usd"] == pytest.approx(250 * 0.08 / 730, 1e-3)


def test_instance_requires_imdsv2_and_stops_on_poweroff(default_program):
    instance = default_program.mocks.one(INSTANCE).inputs
    assert instance["metadataOptions"]["httpTokens"] == "required"
    assert instance["metadataOptions"]["httpPutResponseHopLimit"] == 1
    assert instance["instanceInitiatedShutdownBehavior"] == "stop"


def test_default_is_m5_large_on_ubuntu_noble(default_program):
    instance = default_program.mocks.one(INSTANCE).inputs
    assert (instance["instanceType"], instance["ami"]) == ("m5.large", UBUNTU_AMI)
    ami_calls = [a for t, a in default_program.mocks.calls if t == "aws:ec2/getAmi:getAmi"]
    assert ami_calls[0]["owners"] == [amis.CANONICAL_OWNER_ID]
    names = {f["name"]: f["values"] for f in ami_calls[0]["filters"]}
    assert names["name"] == ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]
    assert ami_calls[0]["mostRecent"] is True


def test_gpu_switch_picks_a_gpu_type_and_the_deep_learning_ami():
    program = run_program({"allowedCidrs": [OPERATOR], "gpu": True})
    instance = program.mocks.one(INSTANCE).inputs
    assert (instance["instanceType"], instance["ami"]) == ("g4dn.xlarge", DLAMI_AMI)
    (ami_call,) = [a for t, a in program.mocks.calls if t == "aws:ec2/getAmi:getAmi"]
    assert ami_call["owners"] == ["amazon"]
    assert ami_call["filters"][0]["values"] == [amis.DEEP_LEARNING_NOBLE.name_pattern]
    user_data = yaml.safe_load(instance["userData"])
    env = next(f for f in user_data["write_files"] if f["path"] == cloud_init.IDLE_ENV)
    assert "TINYCLOUD_GPU=1" in env["content"]
    assert program.outputs["cost_per_hour"]["instance_usd"] == 0.526


def test_explicit_type_and_ami_skip_the_lookup():
    program = run_program(
        {
            "allowedCidrs": [OPERATOR],
            "instanceType": "g5.xlarge",
            "gpu": True,
            "amiId": "ami-0123456789abcdef0",
        }
    )
    instance = program.mocks.one(INSTANCE).inputs
    assert (instance["instanceType"], instance["ami"]) == ("g5.xlarge", "ami-0123456789abcdef0")
    assert not [t for t, _ in program.mocks.calls if t == "aws:ec2/getAmi:getAmi"]


def test_elastic_ip_is_attached_to_the_instance(default_program):
    eip = default_program.mocks.one("aws:ec2/eip:Eip")
    (assoc,) = default_program.mocks.of_type("aws:ec2/eipAssociation:EipAssociation")
    instance = default_program.mocks.one(INSTANCE)
    assert eip.inputs["domain"] == "vpc"
    assert assoc.inputs["allocationId"] == eip.state["allocationId"]
    assert assoc.inputs["instanceId"] == default_program.outputs["instance_id"]
    assert instance.typ == INSTANCE
    assert default_program.outputs["public_ip"] == EIP_ADDRESS


def test_every_taggable_resource_carries_project_stack_and_name(default_program):
    aws_resources = [r for r in default_program.mocks.resources if r.typ.startswith("aws:")]
    assert len(aws_resources) >= 8
    for resource in aws_resources:
        if resource.typ in UNTAGGABLE:
            continue
        tags = resource.inputs.get("tags")
        assert tags, f"{resource.name} has no tags"
        assert tags["project"] == "tinycloud" and tags["stack"] == "dev", resource.name
        assert tags["Name"].startswith("tinycloud-dev"), resource.name
    root_tags = default_program.mocks.one(INSTANCE).inputs["rootBlockDevice"]["tags"]
    assert root_tags["Name"] == "tinycloud-dev-volume"


def test_all_contract_outputs_are_present_and_the_key_is_secret(default_program):
    outputs, secret = default_program.outputs, default_program.secret
    assert set(outputs) == CONTRACT_OUTPUTS
    assert secret["private_key"] is True
    assert [name for name, is_secret in secret.items() if is_secret] == ["private_key"]
    assert outputs["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert outputs["ssh_user"] == "ubuntu"
    assert outputs["api_port"] == 8080
    assert outputs["api_url"] == f"http://{outputs['public_dns']}:8080"
    assert outputs["public_dns"].endswith(".compute-1.amazonaws.com")
    assert outputs["instance_id"].startswith("i-0")
    assert outputs["region"] == "us-east-1"
    assert outputs["cost_per_hour"]["running_usd"] == pytest.approx(0.096 + 0.011 + 0.005, 1e-2)


def test_generated_key_pair_matches_the_exported_private_key(default_program):
    from cryptography.hazmat.primitives import serialization

    key_pair = default_program.mocks.one("aws:ec2/keyPair:KeyPair").inputs
    private = serialization.load_ssh_private_key(
        default_program.outputs["private_key"].encode(), password=None
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert key_pair["publicKey"] == public.decode()


def test_host_key_is_installed_by_cloud_init_and_exported_for_pinning(default_program):
    user_data = default_program.mocks.one(INSTANCE).inputs["userData"]
    config = yaml.safe_load(user_data)
    host_public_key = default_program.outputs["host_public_key"]
    assert host_public_key.startswith("ssh-ed25519 AAAA") and "\n" not in host_public_key
    assert config["ssh_keys"]["ed25519_public"] == host_public_key
    assert config["ssh_keys"]["ed25519_private"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert config["ssh_deletekeys"] is True
    assert config["ssh_genkeytypes"] == ["ed25519"]
    client = default_program.mocks.one("aws:ec2/keyPair:KeyPair").inputs["publicKey"]
    assert client != host_public_key


def test_operators_own_public_key_replaces_the_generated_pair():
    own = (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhZ0lT1n6S0bqzZbV3y0ZQpU9rEJg1m0lW2vJtq3mJk me@laptop"
    )
    program = run_program({"allowedCidrs": [OPERATOR], "sshPublicKey": own})
    assert program.mocks.one("aws:ec2/keyPair:KeyPair").inputs["publicKey"] == own
    keys = program.mocks.of_type("tls:index/privateKey:PrivateKey")
    assert [k.name for k in keys] == ["tinycloud-host-key"]  # no client key generated
    assert program.outputs["private_key"] == "" and program.secret["private_key"] is True


def test_api_port_idle_minutes_and_cap_reach_the_rules_and_the_vm():
    program = run_program(
        {"allowedCidrs": [OPERATOR], "apiPort": 9000, "idleStopMinutes": 0, "maxRunHours": 3}
    )
    assert _ingress_sources(program) == {(22, OPERATOR), (9000, OPERATOR)}
    assert program.outputs["api_url"].endswith(":9000")
    config = yaml.safe_load(program.mocks.one(INSTANCE).inputs["userData"])
    env = next(f for f in config["write_files"] if f["path"] == cloud_init.IDLE_ENV)["content"]
    assert "TINYCLOUD_API_PORT=9000" in env and "TINYCLOUD_IDLE_MINUTES=0" in env
    assert "TINYCLOUD_MAX_RUN_HOURS=3\n" in env
    default = yaml.safe_load(
        run_program({"allowedCidrs": [OPERATOR]}).mocks.one(INSTANCE).inputs["userData"]
    )
    env = next(f for f in default["write_files"] if f["path"] == cloud_init.IDLE_ENV)["content"]
    assert "TINYCLOUD_MAX_RUN_HOURS=12\n" in env


def test_unknown_instance_type_price_says_so():
    program = run_program({"allowedCidrs": [OPERATOR], "instanceType": "m5.24xlarge"})
    cost = program.outputs["cost_per_hour"]
    assert cost["instance_usd"] is None and cost["running_usd"] is None
    assert "not in tinycloud's price table" in cost["summary"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"volumeSizeGb": -5},
            r"tinycloud:volumeSizeGb is -5.*pulumi config set tinycloud:volumeSizeGb 100",
        ),
        ({"volumeSizeGb": "lots"}, r"tinycloud:volumeSizeGb is 'lots'.*whole number"),
        (
            {"gpu": True, "instanceType": "m5.large"},
            r"tinycloud:gpu is true, but .*m5\.large.*no NVIDIA GPU",
        ),
        ({"gpu": True, "instanceType": "p3.2xlarge"}, r"V100"),
        ({"instanceType": "g4dn.xlarge"}, r"a GPU type, but tinycloud:gpu is false"),
        ({"instanceType": "m7g.large"}, r"arm64 \(Graviton\)"),
        ({"instanceType": "big"}, r"not an EC2 instance type"),
        ({"gpu": "yes"}, r"tinycloud:gpu is 'yes'.*true or false"),
        ({"allowedCidrs": ["198.51.100.7/24"]}, r"198\.51\.100\.0/24.*198\.51\.100\.7/32"),
        ({"allowedCidrs": ["my-laptop"]}, r"not a CIDR like 203\.0\.113\.7/32"),
        ({"allowedCidrs": "198.51.100.7/32"}, r"must be a list of strings"),
        ({"apiPort": 22}, r"tinycloud:apiPort is 22"),
        ({"apiPort": 80}, r"1024-65535"),
        ({"idleStopMinutes": 2}, r"0 \(never stop\) or at least 5"),
        ({"maxRunHours": -1}, r"tinycloud:maxRunHours is -1.*0 \(no cap\) or 1-720"),
        ({"maxRunHours": 1000}, r"maxRunHours 12"),
        ({"maxRunHours": "2.5"}, r"tinycloud:maxRunHours is '2\.5'.*whole number"),
        ({"amiId": "ubuntu"}, r"not an AMI id"),
        ({"sshPublicKey": "-----BEGIN OPENSSH PRIVATE KEY-----"}, r"not an OpenSSH public key"),
    ],
)
def test_invalid_config_fails_with_a_clear_message(config, message):
    config = {"allowedCidrs": [OPERATOR], **config}
    with pytest.raises(ConfigError, match=message):
        run_program(config)
