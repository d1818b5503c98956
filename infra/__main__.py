"""The tinycloud training host: one VM, its firewall, keys and address, as a Pulumi program.

    pulumi login --local
    pulumi stack init dev
    pulumi config set aws:region us-east-1
    pulumi up                                   # prints the outputs `fab` reads
    pulumi stack output --json --show-secrets   # what `fab` reads (contract 1)
    pulumi destroy

Reads top to bottom: the stack's config, the look-ups, one ``TrainingHost``, the exports.
Every config key is described in Pulumi.yaml and docs/infra.md.
"""

import sys
from pathlib import Path

# Pulumi runs this file with infra/ itself on sys.path. The repository root goes first so that
# `infra` is one package under one name here, in the tests and in `remote/`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi
import pulumi_aws as aws

from facts import SSH_USER, Output
from infra import amis, config, myip, prices
from infra.training_host import TrainingHost, TrainingHostArgs

# --- config: read once, checked (a bad value stops here with the command that fixes it) -------
settings = config.load(pulumi.Config(config.NAMESPACE), lookup_ip=myip.current_public_ip)

# --- look-ups -----------------------------------------------------------------------------------
region = aws.get_region().region
ami_id = settings.ami_id or amis.latest(gpu=settings.gpu)

# --- the machine --------------------------------------------------------------------------------
host = TrainingHost(
    "tinycloud",
    TrainingHostArgs(
        ami_id=ami_id,
        instance_type=settings.instance_type,
        allowed_cidrs=settings.allowed_cidrs,
        gpu=settings.gpu,
        volume_size_gb=settings.volume_size_gb,
        delete_volume_on_destroy=settings.delete_volume_on_destroy,
        open_to_the_world=settings.open_to_the_world,
        api_port=settings.api_port,
        idle_stop_minutes=settings.idle_stop_minutes,
        max_run_hours=settings.max_run_hours,
        ssh_public_key=settings.ssh_public_key,
        tags={"project": pulumi.get_project(), "stack": pulumi.get_stack()},
    ),
)

# --- outputs (contract 1: `fab` reads these with `pulumi stack output --json --show-secrets`) --
pulumi.export(Output.INSTANCE_ID, host.instance.id)
pulumi.export(Output.PUBLIC_DNS, host.public_dns)
pulumi.export(Output.PUBLIC_IP, host.public_ip)
pulumi.export(Output.REGION, region)
pulumi.export(Output.INSTANCE_TYPE, settings.instance_type)
pulumi.export(Output.SSH_USER, SSH_USER)
pulumi.export(Output.API_PORT, settings.api_port)
pulumi.export(
    Output.API_URL, host.public_dns.apply(lambda dns: f"http://{dns}:{settings.api_port}")
)
pulumi.export(Output.PRIVATE_KEY, pulumi.Output.secret(host.private_key))
pulumi.export(Output.HOST_PUBLIC_KEY, host.host_public_key)
pulumi.export(Output.ALLOWED_CIDRS, list(settings.allowed_cidrs))
cost = prices.estimate(settings.instance_type, settings.volume_size_gb)
pulumi.export(Output.COST_PER_HOUR, cost)
