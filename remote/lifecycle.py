"""Start, stop and wait for the instance with boto3 (its waiters do the polling).

    fab stop      # stop billing for compute; the volume, the runs and the Elastic IP stay
    fab start     # running and passing status checks again; same DNS name (the EIP)

boto3 honours ``AWS_ENDPOINT_URL`` and the usual credential variables by itself, which is how
the tests point it at moto's server. ``TINYCLOUD_WAITER_DELAY`` (seconds) shortens the polling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from remote import paths

Progress = Callable[[str], None]


class LifecycleError(RuntimeError):
    """AWS said no, or could not be asked; the message says which and what to do."""


def ec2(region: str) -> Any:
    import boto3

    return boto3.client("ec2", region_name=region)


def _describe(client: Any, instance_id: str) -> dict[str, Any]:
    reservations = client.describe_instances(InstanceIds=[instance_id])["Reservations"]
    if not reservations or not reservations[0]["Instances"]:
        raise LifecycleError(f"instance {instance_id} not found. Run `pulumi up` to recreate it.")
    return reservations[0]["Instances"][0]


def instance_state(region: str, instance_id: str) -> str:
    """``pending``, ``running``, ``stopping``, ``stopped``, ``terminated``..."""
    with _aws_errors(instance_id):
        return _describe(ec2(region), instance_id)["State"]["Name"]


def launch_time(region: str, instance_id: str) -> float | None:
    """When a running instance last started (epoch seconds; EC2's ``LaunchTime`` is reset by
    every start); None when it is not running."""
    with _aws_errors(instance_id):
        found = _describe(ec2(region), instance_id)
    if found["State"]["Name"] != "running" or "LaunchTime" not in found:
        return None
    return found["LaunchTime"].timestamp()


def start(region: str, instance_id: str, progress: Progress = print) -> str:
    """Start the instance and wait until it runs and passes its status checks; its DNS name."""
    client = ec2(region)
    with _aws_errors(instance_id):
        state = _describe(client, instance_id)["State"]["Name"]
        if state == "terminated":
            raise LifecycleError(f"instance {instance_id} was terminated. Run `pulumi up`.")
        if state not in ("running", "pending"):
            progress(f"starting {instance_id} (was {state})")
            if state == "stopping":
                _wait(client, "instance_stopped", instance_id)
            client.start_instances(InstanceIds=[instance_id])
        wait_ready(client, instance_id, progress)
        return _describe(client, instance_id).get("PublicDnsName") or ""


def stop(region: str, instance_id: str, progress: Progress = print) -> str:
    """Stop the instance and wait until it has stopped; the state it ended in."""
    client = ec2(region)
    with _aws_errors(instance_id):
        state = _describe(client, instance_id)["State"]["Name"]
        if state in ("stopped", "terminated"):
            return state
        progress(f"stopping {instance_id}")
        client.stop_instances(InstanceIds=[instance_id])
        _wait(client, "instance_stopped", instance_id)
        return "stopped"


def wait_ready(client: Any, instance_id: str, progress: Progress = print) -> None:
    """Running and status checks passed (so sshd is up), or an error that says what to do."""
    state = _describe(client, instance_id)["State"]["Name"]
    if state in ("stopped", "stopping", "shutting-down", "terminated"):
        raise LifecycleError(f"instance {instance_id} is {state}: run `fab start`.")
    progress(f"waiting for {instance_id}: running, status checks ok")
    _wait(client, "instance_running", instance_id)
    _wait(client, "instance_status_ok", instance_id)


def ensure_ready(region: str, instance_id: str, progress: Progress = print) -> None:
    with _aws_errors(instance_id):
        wait_ready(ec2(region), instance_id, progress)


def _wait(client: Any, waiter: str, instance_id: str) -> None:
    delay = float(paths.env("WAITER_DELAY") or 5)
    attempts = max(1, int(900 / max(delay, 0.1)))  # fifteen minutes, whatever the delay
    client.get_waiter(waiter).wait(
        InstanceIds=[instance_id], WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
    )


class _aws_errors:
    """Turn botocore's many exceptions into one LifecycleError with a fix in its message."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, err: BaseException | None, tb: object) -> bool:
        if err is None or isinstance(err, LifecycleError):
            return False
        from botocore import exceptions as bx

        iid = self.instance_id
        if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
            raise LifecycleError(
                "no AWS credentials. Set them up as for `pulumi up` (aws configure, or "
                "AWS_PROFILE / AWS_ACCESS_KEY_ID)."
            ) from None
        if isinstance(err, bx.WaiterError):
            raise LifecycleError(
                f"gave up waiting for {iid}: {err}. Check the EC2 console."
            ) from None
        if isinstance(err, bx.ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code.startswith("InvalidInstanceID"):
                raise LifecycleError(f"instance {iid} not found. Run `pulumi up`.") from None
            raise LifecycleError(f"AWS refused ({code}): {err}") from None
        if isinstance(err, bx.BotoCoreError):
            raise LifecycleError(f"cannot reach AWS: {err}") from None
        return False
