"""``TrainingHost``: everything one training VM needs, as one Pulumi component.

It owns: a security group (SSH and the API port from the allowed CIDRs only; egress open), an
SSH client key pair, an SSH host key (installed by cloud-init, so `fab` can pin it), the
instance (encrypted gp3 root volume, IMDSv2 only, stops rather than terminates on poweroff),
and an Elastic IP so the DNS name survives stop/start. ``infra/__main__.py`` makes one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws
import pulumi_tls as tls

from facts import API_PORT
from infra import cloud_init

SSH_PORT = 22
MIN_VOLUME_GB = 8  # the Ubuntu image's own size; config.py asks for more, with reasons
WORLD_PREFIX = {4: 8, 6: 16}  # a CIDR broader than this is "the world" in all but name


def is_world(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """0.0.0.0/0, ::/0, or anything so broad it amounts to them (e.g. 0.0.0.0/1)."""
    return network.prefixlen < WORLD_PREFIX[network.version]


@dataclass
class TrainingHostArgs:
    """What the host is made of. Checked on construction: a bad value fails before any RPC."""

    ami_id: pulumi.Input[str]
    instance_type: str
    allowed_cidrs: Sequence[str]
    gpu: bool = False
    volume_size_gb: int = 100
    delete_volume_on_destroy: bool = False
    open_to_the_world: bool = False
    api_port: int = API_PORT
    idle_stop_minutes: int = 60
    max_run_hours: int = 12  # 0: no cap
    ssh_public_key: str | None = None  # None: generate an ed25519 key pair
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.instance_type or "." not in self.instance_type:
            raise ValueError(f"instance_type {self.instance_type!r} is not like 'm5.large'")
        if self.volume_size_gb < MIN_VOLUME_GB:
            raise ValueError(f"volume_size_gb must be at least {MIN_VOLUME_GB}")
        if self.api_port == SSH_PORT or not 1 <= self.api_port <= 65535:
            raise ValueError(f"api_port {self.api_port} is not a usable TCP port")
        if self.idle_stop_minutes < 0:
            raise ValueError("idle_stop_minutes must be 0 (never) or more")
        if self.max_run_hours < 0:
            raise ValueError("max_run_hours must be 0 (no cap) or more")
        if not self.allowed_cidrs:
            raise ValueError("allowed_cidrs is empty: nobody could reach the host")
        for cidr in self.allowed_cidrs:
            network = ipaddress.ip_network(cidr, strict=True)  # ValueError names the bad one
            if is_world(network) and not self.open_to_the_world:
                raise ValueError(f"{cidr} opens the host to the world; open_to_the_world is off")


def _rule_suffix(cidr: str) -> str:
    """A name fragment per CIDR, so editing the list touches only the rules that changed."""
    return re.sub(r"[^0-9a-zA-Z]+", "-", cidr).strip("-")


class TrainingHost(pulumi.ComponentResource):
    """One EC2 training host with its network rules, keys and address."""

    instance: aws.ec2.Instance
    public_ip: pulumi.Output[str]
    public_dns: pulumi.Output[str]
    private_key: pulumi.Output[str]  # secret; "" when the operator brought their own key
    host_public_key: pulumi.Output[str]

    def __init__(
        self, name: str, args: TrainingHostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("tinycloud:index:TrainingHost", name, None, opts)
        self._name = name
        self._args = args
        child = pulumi.ResourceOptions(parent=self)

        group = self._security_group(child)
        key_pair, self.private_key = self._client_key(child)
        host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=child)
        self.host_public_key = host_key.public_key_openssh.apply(str.strip)
        user_data = pulumi.Output.all(
            host_key.private_key_openssh, host_key.public_key_openssh
        ).apply(
            lambda keys: cloud_init.render_user_data(
                host_private_key=keys[0],
                host_public_key=keys[1],
                api_port=args.api_port,
                idle_stop_minutes=args.idle_stop_minutes,
                gpu=args.gpu,
                max_run_hours=args.max_run_hours,
            )
        )
        self.instance = self._instance(group, key_pair, user_data, child)
        eip = aws.ec2.Eip(f"{name}-eip", domain="vpc", tags=self._tags("eip"), opts=child)
        attached = aws.ec2.EipAssociation(
            f"{name}-eip-assoc",
            instance_id=self.instance.id,
            allocation_id=eip.allocation_id,
            opts=child,
        )
        # Hand out the address only once it points at the instance.
        self.public_ip = pulumi.Output.all(eip.public_ip, attached.id).apply(lambda v: v[0])
        self.public_dns = pulumi.Output.all(eip.public_dns, attached.id).apply(lambda v: v[0])
        self.register_outputs(
            {
                "instance_id": self.instance.id,
                "public_ip": self.public_ip,
                "public_dns": self.public_dns,
                "host_public_key": self.host_public_key,
                "security_group_id": group.id,
            }
        )

    def _tags(self, role: str | None = None) -> dict[str, str]:
        base = f"{self._name}-{pulumi.get_stack()}"
        return {**self._args.tags, "Name": f"{base}-{role}" if role else base}

    def _security_group(self, child: pulumi.ResourceOptions) -> aws.ec2.SecurityGroup:
        name, args = self._name, self._args
        group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            description="tinycloud: SSH and the inference API from the operator only",
            tags=self._tags("sg"),
            opts=child,
        )
        in_group = pulumi.ResourceOptions(parent=group)
        ports = {"ssh": (SSH_PORT, "SSH"), "api": (args.api_port, "inference API")}
        for label, (port, what) in ports.items():
            for cidr in args.allowed_cidrs:
                v6 = ipaddress.ip_network(cidr).version == 6
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-{label}-{_rule_suffix(cidr)}",
                    security_group_id=group.id,
                    description=f"{what} from {cidr}",
                    ip_protocol="tcp",
                    from_port=port,
                    to_port=port,
                    cidr_ipv4=None if v6 else cidr,
                    cidr_ipv6=cidr if v6 else None,
                    tags=self._tags(f"{label}-in"),
                    opts=in_group,
                )
        # The provider removes AWS's default allow-all egress; apt, pip, Docker and the
        # Hugging Face Hub all need the way out.
        for suffix, cidr in (("ipv4", "0.0.0.0/0"), ("ipv6", "::/0")):
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-egress-{suffix}",
                security_group_id=group.id,
                description="all outbound traffic",
                ip_protocol="-1",
                cidr_ipv4=cidr if suffix == "ipv4" else None,
                cidr_ipv6=cidr if suffix == "ipv6" else None,
                tags=self._tags("egress"),
                opts=in_group,
            )
        return group

    def _client_key(
        self, child: pulumi.ResourceOptions
    ) -> tuple[aws.ec2.KeyPair, pulumi.Output[str]]:
        """The operator's login key: their own public key, or an ed25519 pair made here."""
        if self._args.ssh_public_key:
            public_key: pulumi.Input[str] = self._args.ssh_public_key
            private_key = pulumi.Output.secret("")
        else:
            generated = tls.PrivateKey(f"{self._name}-ssh-key", algorithm="ED25519", opts=child)
            public_key = generated.public_key_openssh.apply(str.strip)
            private_key = pulumi.Output.secret(generated.private_key_openssh)
        key_pair = aws.ec2.KeyPair(
            f"{self._name}-key",
            key_name_prefix=f"{self._name}-{pulumi.get_stack()}-",
            public_key=public_key,
            tags=self._tags("key"),
            opts=child,
        )
        return key_pair, private_key

    def _instance(
        self,
        group: aws.ec2.SecurityGroup,
        key_pair: aws.ec2.KeyPair,
        user_data: pulumi.Output[str],
        child: pulumi.ResourceOptions,
    ) -> aws.ec2.Instance:
        args = self._args
        return aws.ec2.Instance(
            f"{self._name}-vm",
            ami=args.ami_id,
            instance_type=args.instance_type,
            key_name=key_pair.key_name,
            vpc_security_group_ids=[group.id],
            user_data=user_data,
            # The idle auto-stop powers off from inside: that must stop, never terminate.
            instance_initiated_shutdown_behavior="stop",
            root_block_device={
                "volume_size": args.volume_size_gb,
                "volume_type": "gp3",
                "encrypted": True,
                "delete_on_termination": args.delete_volume_on_destroy,
                "tags": self._tags("volume"),
            },
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",  # IMDSv2 only: no credential theft by plain GET
                "http_put_response_hop_limit": 1,  # containers cannot reach the metadata service
            },
            tags=self._tags(),
            opts=pulumi.ResourceOptions.merge(
                child,
                # A newer AMI or edited user data must not replace a host full of runs;
                # `pulumi up --replace` does that on purpose (see docs/infra.md).
                pulumi.ResourceOptions(ignore_changes=["ami", "user_data"]),
            ),
        )
