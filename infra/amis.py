"""Which machine image the training host boots: looked up at `pulumi up`, newest first.

- CPU: Canonical's Ubuntu 24.04 LTS (noble) server image, gp3-backed, amd64.
- GPU: AWS's Deep Learning Base AMI for Ubuntu 24.04 with the open-source NVIDIA driver, CUDA,
  Docker and the NVIDIA container toolkit already installed.

``tinycloud:amiId`` skips the look-up. The instance ignores later AMI changes (see host.py), so a
new Ubuntu release never replaces a running host by surprise.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi_aws as aws

CANONICAL_OWNER_ID = "099720109477"  # Canonical's AWS account: only it publishes these names


@dataclass(frozen=True)
class AmiQuery:
    owner: str
    name_pattern: str
    description: str


UBUNTU_NOBLE = AmiQuery(
    owner=CANONICAL_OWNER_ID,
    name_pattern="ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*",
    description="Ubuntu 24.04 LTS (Canonical)",
)
DEEP_LEARNING_NOBLE = AmiQuery(
    owner="amazon",
    name_pattern="Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)*",
    description="AWS Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)",
)


def query_for(gpu: bool) -> AmiQuery:
    return DEEP_LEARNING_NOBLE if gpu else UBUNTU_NOBLE


def latest(gpu: bool) -> str:
    """The id of the newest image for this kind of host, in the provider's region."""
    query = query_for(gpu)
    result = aws.ec2.get_ami(
        most_recent=True,
        owners=[query.owner],
        filters=[
            {"name": "name", "values": [query.name_pattern]},
            {"name": "architecture", "values": ["x86_64"]},
            {"name": "virtualization-type", "values": ["hvm"]},
            {"name": "root-device-type", "values": ["ebs"]},
        ],
    )
    return result.id
