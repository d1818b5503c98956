"""What the training host costs per hour, from a small dated price table.

    python -m infra.prices m5.large 100      # prints the estimate as JSON

The numbers are AWS on-demand list prices for Linux in us-east-1 as of ``PRICES_AS_OF``; other
regions differ (usually by 0-30%). They are an estimate to keep in mind, not a bill: check
https://aws.amazon.com/ec2/pricing/on-demand/ before relying on them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PRICES_AS_OF = "2025-06-01"
PRICE_REGION = "us-east-1"
PRICING_URL = "https://aws.amazon.com/ec2/pricing/on-demand/"

HOURS_PER_MONTH = 730  # AWS bills per-GB-month volumes over 730 hours
GP3_USD_PER_GB_MONTH = 0.08  # gp3 storage at its baseline 3000 IOPS / 125 MB/s (no extra charge)
PUBLIC_IPV4_USD_PER_HOUR = 0.005  # every public IPv4, Elastic IPs included, since 2024-02-01

# USD per hour, on-demand, Linux, us-east-1.
INSTANCE_USD_PER_HOUR: dict[str, float] = {
    "t3.large": 0.0832,
    "t3.xlarge": 0.1664,
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "m6i.large": 0.096,
    "m6i.xlarge": 0.192,
    "m7i.large": 0.1008,
    "m7i.xlarge": 0.2016,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
    "c6i.2xlarge": 0.34,
    "r5.large": 0.126,
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.12xlarge": 5.672,
    "g6.xlarge": 0.8048,
    "g6.2xlarge": 0.9776,
    "g6.12xlarge": 4.6016,
    "g6e.xlarge": 1.861,
}


def estimate(instance_type: str, volume_size_gb: int) -> dict[str, Any]:
    """Running and stopped cost per hour; ``None`` (and a note) where the table has no price.

    Stopped still costs something: the volume and the Elastic IP bill until `pulumi destroy`.
    """
    volume = round(volume_size_gb * GP3_USD_PER_GB_MONTH / HOURS_PER_MONTH, 4)
    stopped = round(volume + PUBLIC_IPV4_USD_PER_HOUR, 4)
    instance = INSTANCE_USD_PER_HOUR.get(instance_type)
    running = None if instance is None else round(instance + stopped, 4)
    basis = f"{PRICE_REGION} on-demand prices as of {PRICES_AS_OF}"
    if running is None:
        summary = (
            f"{instance_type} is not in tinycloud's price table (infra/prices.py): see "
            f"{PRICING_URL} for its hourly price. The {volume_size_gb} GB volume and the "
            f"public IP add ${stopped:.3f}/hour, running or stopped ({basis})."
        )
    else:
        summary = (
            f"about ${running:.3f}/hour while running ({instance_type} ${instance:.4f} + "
            f"{volume_size_gb} GB gp3 ${volume:.4f} + public IPv4 ${PUBLIC_IPV4_USD_PER_HOUR:.3f}),"
            f" ${stopped:.3f}/hour while stopped ({basis})"
        )
    return {
        "instance_type": instance_type,
        "instance_usd": instance,
        "volume_usd": volume,
        "public_ipv4_usd": PUBLIC_IPV4_USD_PER_HOUR,
        "running_usd": running,
        "stopped_usd": stopped,
        "prices_as_of": PRICES_AS_OF,
        "price_region": PRICE_REGION,
        "summary": summary,
    }


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        sys.exit("usage: python -m infra.prices INSTANCE_TYPE VOLUME_GB")
    print(json.dumps(estimate(sys.argv[1], int(sys.argv[2])), indent=2))
