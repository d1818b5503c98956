"""Why an SSH connection failed, in words that say what to do next.

A refused or timed-out connection to a tinycloud host has three usual causes, checked in order:
the instance is stopped (boto3 knows, when the stack names the instance and region), the
operator's public IP moved out of the security group's allowed CIDRs (the stack lists them;
``TINYCLOUD_CURRENT_IP`` overrides the look-up, so tests never use the network), or the VM is
still booting. Host-key and authentication failures get their own explanations.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from remote import paths
from remote.target import Target, in_cidrs

# The stack setting that lists who may connect (infra/config.py, `tinycloud:allowedCidrs`).
ALLOWED_CIDRS_KEY = "tinycloud:allowedCidrs"


def explain_connect_error(
    target: Target, err: BaseException, current_ip: Callable[[], str | None] | None = None
) -> str:
    import paramiko

    where = f"{target.user}@{target.host}:{target.port}"
    if isinstance(err, paramiko.BadHostKeyException):
        return (
            f"{where} presented a host key that does not match the pinned one in "
            f"{target.known_hosts}. Refusing to connect: this is what a man-in-the-middle looks "
            "like. If the instance was replaced, `pulumi up` updates host_public_key; run again."
        )
    if isinstance(err, paramiko.AuthenticationException):
        return (
            f"{where} refused the key {target.key_file or '(ssh-agent / ~/.ssh)'}. For a stack, "
            "`pulumi up` may have replaced the key pair: run again to pick up the new one. "
            "With --host, pass the key that host expects with --key."
        )
    if isinstance(err, paramiko.SSHException) and "known_hosts" in str(err):
        return (
            f"{where} is not in {target.known_hosts}, and tinycloud never trusts a host key on "
            "first use. Check its fingerprint out of band, then add it, e.g. "
            f"`ssh-keyscan -p {target.port} {target.host} >> {target.known_hosts}`, or set "
            "TINYCLOUD_KNOWN_HOSTS to a file that has it."
        )
    return explain_unreachable(target, err, current_ip or lookup_current_ip)


def explain_unreachable(
    target: Target, err: BaseException, current_ip: Callable[[], str | None]
) -> str:
    head = f"cannot reach {target.user}@{target.host}:{target.port} over SSH ({_reason(err)})."
    state = _instance_state(target)
    if state and state != "running":
        return (
            f"{head} Instance {target.instance_id} is {state}: run `fab start` "
            "(then `fab setup` if this is its first boot)."
        )
    cidrs = target.allowed_cidrs
    ip = current_ip() if cidrs else None
    if cidrs and ip and not in_cidrs(ip, cidrs):
        return (
            f"{head}\nThe security group admits SSH only from {', '.join(cidrs)}, but this "
            f"machine's public IP is now {ip}. Allow it and apply:\n"
            f"    pulumi config set --path '{ALLOWED_CIDRS_KEY}[0]' {ip}/32\n"
            "    pulumi up"
        )
    hint = "Is the instance up (`fab start`)? A new instance needs a minute or two to boot."
    if state == "running":
        hint = "The instance is running; it may still be booting. Wait a minute and retry."
    return f"{head} {hint}"


def lookup_current_ip() -> str | None:
    """This machine's public IP: ``TINYCLOUD_CURRENT_IP`` if set, else asked of AWS's checkip."""
    override = paths.env("CURRENT_IP")
    if override:
        return override
    from infra.myip import IpLookupError, current_public_ip

    try:
        return current_public_ip()
    except IpLookupError:
        return None


def _instance_state(target: Target) -> str | None:
    if not (target.instance_id and target.region):
        return None
    from remote.lifecycle import LifecycleError, instance_state

    try:
        return instance_state(target.region, target.instance_id)
    except LifecycleError:
        return None  # no credentials or no AWS from here: explain with what we know


def _reason(err: BaseException) -> str:
    if isinstance(err, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the name: {err.strerror}"
    text = str(err) or type(err).__name__
    if "Unable to connect" in text:
        return "connection refused"
    return text
