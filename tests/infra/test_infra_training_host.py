"""infra/training_host.py: TrainingHostArgs refuses a bad argument before any resource exists."""

from __future__ import annotations

import pulumi
import pytest
from infra_harness import EIP_ADDRESS

from infra.training_host import TrainingHost, TrainingHostArgs, is_world


def args(**overrides) -> TrainingHostArgs:
    values = {"ami_id": "ami-0123456789abcdef0", "instance_type": "m5.large"}
    return TrainingHostArgs(**{"allowed_cidrs": ["198.51.100.7/32"], **values, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"allowed_cidrs": []}, "nobody could reach"),
        ({"allowed_cidrs": ["0.0.0.0/0"]}, "opens the host to the world"),
        ({"allowed_cidrs": ["198.51.100.7/24"]}, "has host bits set"),
        ({"volume_size_gb": -1}, "at least 8"),
        ({"api_port": 22}, "not a usable TCP port"),
        ({"idle_stop_minutes": -5}, "0 \\(never\\)"),
        ({"max_run_hours": -1}, "0 \\(no cap\\)"),
        ({"instance_type": "large"}, "not like 'm5.large'"),
    ],
)
def test_bad_arguments_fail_early(overrides, message):
    with pytest.raises(ValueError, match=message):
        args(**overrides)


def test_world_needs_the_explicit_switch():
    assert args(allowed_cidrs=["0.0.0.0/0"], open_to_the_world=True).open_to_the_world


def test_is_world():
    import ipaddress

    world = ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/7"]
    local = ["10.0.0.0/8", "198.51.100.7/32", "2001:db8::/32"]
    assert all(is_world(ipaddress.ip_network(c)) for c in world)
    assert not any(is_world(ipaddress.ip_network(c)) for c in local)


# --- the component alone, in Pulumi's documented style: assertions inside .apply -------------


@pytest.fixture
def mocks():
    """A fresh mock engine, so this component's resources are the only ones recorded."""
    from infra_harness import InfraMocks, ensure_event_loop
    from pulumi.runtime import settings as runtime_settings

    ensure_event_loop()
    mocks = InfraMocks()
    runtime_settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project="tinycloud", stack="ci", preview=False)
    return mocks


@pulumi.runtime.test
def test_component_children_are_parented_named_and_the_address_follows_the_eip(mocks):
    host = TrainingHost("lab", args(tags={"project": "tinycloud", "stack": "ci"}))

    def check(values):
        public_ip, public_dns, instance_id = values
        assert public_ip == EIP_ADDRESS
        assert public_dns.startswith("ec2-203-0-113-10.")
        assert instance_id.startswith("i-0")
        children = [r.name for r in mocks.resources if r.typ != "tinycloud:index:TrainingHost"]
        assert children and all(name.startswith("lab-") for name in children)
        instance = mocks.one("aws:ec2/instance:Instance").inputs
        assert instance["tags"]["Name"] == "lab-ci"

    return pulumi.Output.all(host.public_ip, host.public_dns, host.instance.id).apply(check)
