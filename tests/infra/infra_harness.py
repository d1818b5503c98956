"""Run the real Pulumi program (infra/__main__.py) under Pulumi's mock runtime.

Pulumi's unit-testing pattern (pulumi/examples testing-unit-py): ``set_mocks`` replaces the
engine, the program registers its resources against ``InfraMocks``, which records every
resource's inputs and answers the AMI and region look-ups, and ``@pulumi.runtime.test`` waits
for every output. ``run_program`` gives each run a fresh root stack and mock monitor, so runs
never see each other's resources or exports.
"""

from __future__ import annotations

import asyncio
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from pulumi.runtime import settings as runtime_settings

from infra.cloud_init import new_ed25519_keypair

INFRA_DIR = Path(__file__).resolve().parents[2] / "infra"
UBUNTU_AMI = "ami-0a0e5d9c7acc336f1"
DLAMI_AMI = "ami-0d2c8b9f3e41a7d65"
EIP_ADDRESS = "203.0.113.10"
REGION = "us-east-1"


def _ed25519_pair() -> tuple[str, str]:
    private, public = new_ed25519_keypair()
    return private, public + "\n"  # the tls provider ends the line with a newline


@dataclass
class Registered:
    typ: str
    name: str
    inputs: dict[str, Any]
    state: dict[str, Any]


class InfraMocks(pulumi.runtime.Mocks):
    """Plausible ids and attributes, as AWS and the tls provider would return them."""

    def __init__(self) -> None:
        self.resources: list[Registered] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        state = dict(args.inputs)
        n = len(self.resources)
        rid = f"{args.name}-id"
        if args.typ == "tls:index/privateKey:PrivateKey":
            private, public = _ed25519_pair()
            state.update(privateKeyOpenssh=private, publicKeyOpenssh=public)
        elif args.typ == "aws:ec2/instance:Instance":
            rid = f"i-0{n:016x}"
            state.update(publicIp="198.51.100.23", privateIp="172.31.5.9", arn=f"arn:{rid}")
        elif args.typ == "aws:ec2/eip:Eip":
            rid = f"eipalloc-0{n:016x}"
            dns = "ec2-" + EIP_ADDRESS.replace(".", "-") + ".compute-1.amazonaws.com"
            state.update(allocationId=rid, publicIp=EIP_ADDRESS, publicDns=dns)
        elif args.typ == "aws:ec2/securityGroup:SecurityGroup":
            rid = f"sg-0{n:016x}"
        elif args.typ == "aws:ec2/keyPair:KeyPair":
            state.update(keyName=state.get("keyNamePrefix", "key-") + "20261124")
        self.resources.append(Registered(args.typ, args.name, dict(args.inputs), state))
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ec2/getAmi:getAmi":
            owners = args.args.get("owners", [])
            ami = DLAMI_AMI if owners == ["amazon"] else UBUNTU_AMI
            return {"id": ami, "imageId": ami, "architecture": "x86_64"}, []
        if args.token == "aws:index/getRegion:getRegion":
            return {"region": REGION, "name": REGION, "id": REGION}, []
        raise AssertionError(f"the program made an unexpected call: {args.token}")

    def of_type(self, typ: str) -> list[Registered]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Registered:
        found = self.of_type(typ)
        assert len(found) == 1, f"expected one {typ}, got {len(found)}"
        return found[0]


@dataclass
class Program:
    mocks: InfraMocks
    outputs: dict[str, Any] = field(default_factory=dict)
    secret: dict[str, bool] = field(default_factory=dict)


def _config_value(value: Any) -> str:
    # The CLI hands every value to the program as a string; lists arrive JSON-encoded.
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def ensure_event_loop() -> None:
    """Pulumi's runtime runs on the current event loop; an ``asyncio.run`` elsewhere in the
    session (the server tests' clients) leaves none set, so give it one."""
    try:
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


def run_program(config: dict[str, Any] | None = None, *, stack: str = "dev") -> Program:
    """Run infra/__main__.py with ``tinycloud:<key>`` config; return its resources and exports."""
    ensure_event_loop()
    mocks = InfraMocks()
    runtime_settings.ROOT.set(None)  # a fresh root stack: no exports left from an earlier run
    pulumi.runtime.set_mocks(mocks, project="tinycloud", stack=stack, preview=False)
    pulumi.runtime.set_all_config(
        {f"tinycloud:{k}": _config_value(v) for k, v in (config or {}).items()}, []
    )
    program = Program(mocks)

    async def collect(outputs: dict[str, Any]) -> None:
        for name, value in outputs.items():
            output = pulumi.Output.from_input(value)
            program.outputs[name] = await output.future()
            program.secret[name] = await output.is_secret()

    @pulumi.runtime.test
    def run():
        runpy.run_path(str(INFRA_DIR), run_name="__main__")
        return collect(runtime_settings.get_root_resource().outputs)

    run()
    return program
