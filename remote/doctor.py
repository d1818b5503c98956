"""`fab doctor`: the questions a first-time user gets stuck on, answered on one screen.

    fab doctor                      # the stack path: Pulumi, AWS, your IP, keys, the VM
    fab doctor --host me@203.0.113.9 --key ~/.ssh/id_ed25519    # any SSH host: keys and the VM

Each line is ✓ (fine), ✗ (broken: the line under it is the exact fix) or ? (could not be
told from here, with how to check by hand). Checks run in the order a set-up goes, and a check
that needs an earlier one (the VM needs the stack's outputs) says so instead of guessing.
Nothing is changed: the Pulumi CLI is asked read-only questions (version, whoami, stack,
config, stack output), AWS read-only ones (sts:GetCallerIdentity, ec2:DescribeInstanceTypes,
servicequotas:GetServiceQuota, ec2:DescribeInstances); the VM is logged in to once.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from invoke import Exit

from facts import Output
from remote import paths
from remote.target import Target, in_cidrs, resolve, stack_target

MARKS = {True: "✓", False: "✗", None: "?"}
NAME_WIDTH = 24
INSTALL_PULUMI = "curl -fsSL https://get.pulumi.com | sh   (or: brew install pulumi/tap/pulumi)"
# EC2 vCPU quotas by instance family (Service Quotas codes; "Running On-Demand ... instances").
QUOTAS = {
    "g": ("L-DB2E81BA", "G and VT"),
    "vt": ("L-DB2E81BA", "G and VT"),
    "p": ("L-417A185B", "P"),
    "f": ("L-74FC7D96", "F"),
    "x": ("L-7295265B", "X"),
    "inf": ("L-1945791B", "Inf"),
    "trn": ("L-2C3B7624", "Trn"),
}
STANDARD_QUOTA = ("L-1216C47A", "Standard (A, C, D, H, I, M, R, T, Z)")


@dataclass
class Check:
    what: str
    ok: bool | None
    detail: str
    fix: str = ""
    skipped: bool = False  # not checked, because an earlier check failed

    def render(self) -> str:
        line = f"{MARKS[self.ok]} {self.what.ljust(NAME_WIDTH)} {self.detail}"
        if self.fix:
            line += "\n" + " " * (NAME_WIDTH + 3) + "fix: " + self.fix.replace("\n", "\n     ")
        return line


@dataclass
class Findings:
    """What the checks learned, for the checks after them."""

    checks: list[Check] = field(default_factory=list)
    stack: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    target: Target | None = None
    aws: bool = False
    region: str = ""

    def add(self, what: str, ok: bool | None, detail: str, fix: str = "") -> None:
        self.checks.append(Check(what, ok, detail, fix))

    def needs(self, what: str, earlier: str) -> None:
        self.checks.append(Check(what, False, f"not checked: needs {earlier}", skipped=True))


def diagnose(target: str, stack: str, host: str, user: str, key: str) -> list[Check]:
    """Every check for where the task flags point, in order."""
    kind = (target or paths.env("TARGET") or "remote").lower()
    f = Findings(stack=stack or paths.env("STACK"))
    if kind == "local":
        local_checks(f)
        return f.checks
    if host or paths.env("HOST"):
        f.target = resolve(target, stack, host, user, key)
        vm_checks(f)
        return f.checks
    for step in (pulumi_cli, pulumi_backend, pulumi_stack, pulumi_config, stack_outputs):
        step(f)
    for step in (aws_credentials, aws_region, vcpu_quota, current_ip):
        step(f)
    vm_checks(f)
    return f.checks


def vm_checks(f: Findings) -> None:
    for step in (key_files, instance_state, vm_login):
        step(f)


# --- Pulumi ------------------------------------------------------------------------------------


def _pulumi(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            ["pulumi", *args], cwd=paths.ROOT, capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        return None


def _error(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines() or ["failed"]
    return lines[-1].removeprefix("error: ")


def pulumi_cli(f: Findings) -> None:
    proc = _pulumi("version")
    if proc is None or proc.returncode != 0:
        f.add("Pulumi CLI", False, "not installed (or not on PATH)", INSTALL_PULUMI)
    else:
        f.add("Pulumi CLI", True, proc.stdout.strip())


def pulumi_backend(f: Findings) -> None:
    if not f.checks[-1].ok:
        return f.needs("Pulumi backend", "the Pulumi CLI")
    proc = _pulumi("whoami", "--verbose")
    if proc.returncode != 0:
        fix = "pulumi login --local   (state in ~/.pulumi on this machine; no account needed)"
        return f.add("Pulumi backend", False, f"not logged in ({_error(proc)})", fix)
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    who = fields.get("User", "?").strip()
    backend = fields.get("Backend URL", "?").strip()
    f.add("Pulumi backend", True, f"logged in as {who} at {backend}")


def _stack_flag(f: Findings) -> list[str]:
    return ["--stack", f.stack] if f.stack else []


def pulumi_stack(f: Findings) -> None:
    if not f.checks[-1].ok:
        return f.needs("stack selected", "the Pulumi backend")
    proc = _pulumi("stack", "--show-name", *_stack_flag(f))
    if proc.returncode != 0:
        fix = "pulumi stack select dev   (or, the first time: pulumi stack init dev)"
        return f.add("stack selected", False, _error(proc), fix)
    f.stack = proc.stdout.strip()
    f.add("stack selected", True, f.stack)


def pulumi_config(f: Findings) -> None:
    """`pulumi config` decrypts with the passphrase, so it answers both questions."""
    if not f.checks[-1].ok:
        return f.needs("passphrase", "a stack")
    proc = _pulumi("config", "--json", *_stack_flag(f))
    if proc.returncode != 0:
        if "passphrase" in (proc.stderr or "").lower():
            fix = "export PULUMI_CONFIG_PASSPHRASE='the one you chose at `pulumi stack init`'"
            return f.add("passphrase", False, "PULUMI_CONFIG_PASSPHRASE is not set", fix)
        return f.add("passphrase", None, f"`pulumi config` failed: {_error(proc)}")
    f.config = {k: v.get("value") for k, v in json.loads(proc.stdout or "{}").items()}
    how = "set" if _passphrase_given() else "not needed by this stack's secrets provider"
    f.add("passphrase", True, how)


def _passphrase_given() -> bool:
    return any(
        os.environ.get(v) for v in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE")
    )


def stack_outputs(f: Findings) -> None:
    """Readable, complete, and written down as `fab` uses them (key file, pinned host key)."""
    try:
        f.target = stack_target(f.stack)
    except Exit as why:
        return f.add("stack outputs", False, str(why.message), "pulumi up")
    outputs = f.target.outputs
    what = f"{len(outputs)} outputs of stack {f.target.name}"
    f.add("stack outputs", True, f"{what}; instance {outputs.get(Output.INSTANCE_ID, '?')}")


# --- AWS ---------------------------------------------------------------------------------------


def _aws_error(err: Exception) -> str:
    """``Code: message`` from a ClientError, without botocore's "An error occurred" wrapping."""
    error = getattr(err, "response", {}).get("Error", {})
    if error.get("Code"):
        return f"{error['Code']}: {error.get('Message', '')}".rstrip(": ")
    return str(err)


def aws_credentials(f: Findings) -> None:
    import boto3
    from botocore import exceptions as bx

    fix = "aws configure   (AWS Academy: paste the AWS Details → AWS CLI lines into your shell)"
    session = boto3.Session()
    if session.get_credentials() is None:
        return f.add("AWS credentials", False, "none found (environment, ~/.aws, profile)", fix)
    try:
        who = session.client(
            "sts", region_name=_region_hint(f) or "us-east-1"
        ).get_caller_identity()
    except (bx.BotoCoreError, bx.ClientError) as err:
        fresh = "export fresh credentials (AWS Academy ones expire after a few hours)"
        return f.add("AWS credentials", False, f"refused: {_aws_error(err)}", fresh)
    f.aws = True
    f.add("AWS credentials", True, f"account {who['Account']} ({who['Arn']})")


def _region_hint(f: Findings) -> str:
    import boto3

    outputs = f.target.outputs if f.target else {}
    found = outputs.get(Output.REGION) or f.config.get("aws:region")
    return str(found or boto3.Session().region_name or "")


def aws_region(f: Findings) -> None:
    f.region = _region_hint(f)
    if not f.region:
        fix = "pulumi config set aws:region us-east-1"
        return f.add("AWS region", False, "no region in the stack config or the environment", fix)
    where = "the stack's outputs" if f.target else "the stack config or environment"
    f.add("AWS region", True, f"{f.region} (from {where})")


def instance_type(f: Findings) -> str:
    """The stack's type: its output once it exists, else what `pulumi up` would pick."""
    if f.target and f.target.outputs.get(Output.INSTANCE_TYPE):
        return str(f.target.outputs[Output.INSTANCE_TYPE])
    chosen = f.config.get("tinycloud:instanceType")
    if chosen:
        return str(chosen)
    return "g4dn.xlarge" if str(f.config.get("tinycloud:gpu")).lower() == "true" else "m5.large"


def quota_for(type_name: str) -> tuple[str, str]:
    """The vCPU quota an instance type counts against: by the letters of its family."""
    letters = re.match(r"[a-z]*", type_name)[0]  # g4dn.xlarge -> g, inf2.xlarge -> inf
    for prefix in sorted(QUOTAS, key=len, reverse=True):
        if letters.startswith(prefix):
            return QUOTAS[prefix]
    return STANDARD_QUOTA


def vcpu_quota(f: Findings) -> None:
    if not (f.aws and f.region):
        return f.needs("vCPU quota", "AWS credentials and a region")
    import boto3
    from botocore import exceptions as bx

    kind = instance_type(f)
    code, name = quota_for(kind)
    try:
        described = boto3.client("ec2", region_name=f.region).describe_instance_types(
            InstanceTypes=[kind]
        )
        need = described["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"]
        quota = boto3.client("service-quotas", region_name=f.region).get_service_quota(
            ServiceCode="ec2", QuotaCode=code
        )["Quota"]["Value"]
    except (bx.BotoCoreError, bx.ClientError, IndexError, KeyError) as err:
        look = f"aws service-quotas get-service-quota --service-code ec2 --quota-code {code}"
        return f.add("vCPU quota", None, f"could not read it ({_aws_error(err)}); by hand: {look}")
    quota_line(f, kind, need, quota, code, name)


def quota_line(f: Findings, kind: str, need: int, quota: float, code: str, name: str) -> None:
    detail = f"{kind} needs {need} vCPUs; 'Running On-Demand {name} instances' allows {quota:g}"
    if quota >= need:
        return f.add("vCPU quota", True, detail)
    fix = (
        f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code "
        f"{code} --desired-value {need}   (approval takes hours to days; AWS Academy allows no GPU)"
    )
    f.add("vCPU quota", False, detail, fix)


def current_ip(f: Findings) -> None:
    if not f.target:
        return f.needs("your IP allowed", "the stack outputs")
    from remote.diagnose import ALLOWED_CIDRS_KEY, lookup_current_ip

    cidrs = f.target.allowed_cidrs
    ip = lookup_current_ip()
    if ip is None:
        return f.add("your IP allowed", None, "could not look up your public IP (offline?)")
    if in_cidrs(ip, cidrs):
        return f.add("your IP allowed", True, f"{ip} is in {', '.join(cidrs)}")
    fix = f"pulumi config set --path '{ALLOWED_CIDRS_KEY}[0]' {ip}/32 && pulumi up"
    f.add("your IP allowed", False, f"{ip} is not in {', '.join(cidrs)}", fix)


# --- the VM ------------------------------------------------------------------------------------


def key_files(f: Findings) -> None:
    """OpenSSH (fab ssh, rsync) refuses a key others can read; both files must be there."""
    t = f.target
    if t is None:
        return f.needs("key and known_hosts", "the stack outputs")
    problems, fixes = [], []
    if t.key_file:
        mode = stat.S_IMODE(t.key_file.stat().st_mode) if t.key_file.exists() else None
        if mode is None:
            problems.append(f"{t.key_file} is missing")
        elif mode & 0o077:
            problems.append(f"{t.key_file} is {mode:o}, readable by others")
            fixes.append(f"chmod 600 {t.key_file}")
    if not (t.known_hosts and _knows(t.known_hosts, t.host, t.port)):
        problems.append(f"{t.known_hosts} has no key for {t.host}")
        fixes.append(
            "for a stack: run any fab task (it pins the stack's host key); for --host: "
            f"ssh-keyscan -p {t.port} {t.host} >> {t.known_hosts} after checking the fingerprint"
        )
    if problems:
        return f.add("key and known_hosts", False, "; ".join(problems), "\n".join(fixes))
    f.add("key and known_hosts", True, f"{t.key_file or 'ssh-agent/~/.ssh'} 0600; host key pinned")


def _knows(known_hosts: Path, host: str, port: int) -> bool:
    from paramiko import HostKeys

    try:
        keys = HostKeys(str(known_hosts))
    except OSError:
        return False
    return bool(keys.lookup(host if port == 22 else f"[{host}]:{port}"))


def instance_state(f: Findings) -> None:
    t = f.target
    if t is None or not (t.instance_id and t.region):
        return  # --host: no instance to ask about
    if not f.aws:
        return f.needs("instance", "AWS credentials")
    from remote.lifecycle import LifecycleError
    from remote.lifecycle import instance_state as state_of

    try:
        state = state_of(t.region, t.instance_id)
    except LifecycleError as err:
        return f.add("instance", False, str(err), "pulumi up")
    if state == "running":
        return f.add("instance", True, f"{t.instance_id} is running")
    f.add("instance", False, f"{t.instance_id} is {state}", "fab start")


def vm_login(f: Findings) -> None:
    """Log in once: reachable, booted (cloud-init's ready marker), environment built."""
    t = f.target
    if t is None:
        return f.needs("VM reachable", "the stack outputs")
    if f.checks and f.checks[-1].what == "instance" and f.checks[-1].ok is False:
        return f.needs("VM reachable", "a running instance")
    from remote.boot import ready_marker
    from remote.runner import connect

    try:
        runner = connect(t)
    except Exit as why:  # the message already says what to do (see remote/diagnose.py)
        return f.add("VM reachable", False, f"cannot log in to {t.host}:{t.port}", why.message)
    with runner:
        f.add("VM reachable", True, f"logged in as {t.user}@{t.host}:{t.port}")
        marker = ready_marker()
        required = t.from_stack or bool(paths.env("READY_MARKER"))
        if required and not runner.run(f"test -e {marker}", warn=True).ok:
            see = "wait a few minutes (progress: /var/log/cloud-init-output.log via fab ssh --open)"
            return f.add("VM ready", False, f"still booting (no {marker})", see)
        python = (runner.read_text(".python") or "").strip()
        if not python:
            return f.add("VM ready", False, "booted, but no job environment yet", "fab setup")
        f.add("VM ready", True, f"booted; job environment {python}")


# --- this machine ------------------------------------------------------------------------------


def local_checks(f: Findings) -> None:
    import importlib.util

    need = {"train": ("torch", "transformers", "datasets", "matplotlib"), "serve": ("uvicorn",)}
    for group, modules in need.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        fix = "uv run --locked --all-groups fab ...   (installs every group into .venv)"
        ok = not missing
        detail = "installed" if ok else f"missing {', '.join(missing)}"
        f.add(f"{group} group here", ok, detail, "" if ok else fix)
    have = importlib.util.find_spec("jupyterlab") is not None
    f.add(
        "notebook group here",
        True if have else None,
        "installed" if have else "not installed (only `fab notebook --target local` needs it)",
    )


def report(checks: list[Check], out: Callable[[str], None] = print) -> int:
    """Print the screen; the number of checks that failed (not counting those skipped)."""
    for c in checks:
        out(c.render())
    return sum(c.ok is False and not c.skipped for c in checks)
