"""The operator's current public IP address, asked of a check service at `pulumi up`.

    python -m infra.myip        # prints e.g. 203.0.113.7

The security group admits SSH and the API from this address only (as a /32) unless
``tinycloud:allowedCidrs`` says otherwise. The program calls ``current_public_ip`` only when
that setting is empty, and takes the function as an argument, so tests never reach the network.
"""

from __future__ import annotations

import ipaddress
import sys
import urllib.error
import urllib.request

CHECK_URL = "https://checkip.amazonaws.com"  # AWS's own; answers the caller's IPv4 as text
TIMEOUT_S = 5.0  # `pulumi up` should fail fast with the fix, not hang


class IpLookupError(RuntimeError):
    """The public address could not be found; the message says why."""


def current_public_ip(url: str = CHECK_URL, timeout: float = TIMEOUT_S) -> str:
    """The caller's public address as the check service sees it (e.g. ``"203.0.113.7"``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed URL)
            body = response.read(100).decode("ascii", errors="replace").strip()
    except (OSError, urllib.error.URLError, ValueError) as err:
        raise IpLookupError(f"{url} could not be reached ({err}; timeout {timeout:g}s)") from err
    try:
        address = ipaddress.ip_address(body)
    except ValueError:
        raise IpLookupError(f"{url} answered {body[:40]!r}, which is not an IP address") from None
    if not address.is_global:
        raise IpLookupError(f"{url} answered {address}, which is not a public address")
    return str(address)


if __name__ == "__main__":
    try:
        print(current_public_ip())
    except IpLookupError as err:
        sys.exit(f"error: {err}")
