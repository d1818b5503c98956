"""infra/cloud_init.py and the scripts in infra/vm/: valid cloud-config, clean shell, and the
idle auto-stop and bootstrap logic run for real with the system tools they call (nft, ss, who,
systemctl, apt-get, ...) replaced by recording stand-ins on PATH.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from facts import VM_RUNS_DIR, VM_STATE_DIR
from infra import cloud_init

PRIVATE = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFPcTuUF6yrKoHDNNsIMofRsDayy17RA0LefYJkAV2yt"
IDLE_SCRIPT = cloud_init.VM_DIR / "tinycloud-idle.sh"
BOOTSTRAP = cloud_init.VM_DIR / "tinycloud-bootstrap.sh"
BASH = shutil.which("bash") or "/bin/bash"


def render(**overrides) -> str:
    values = {
        "host_private_key": PRIVATE,
        "host_public_key": PUBLIC,
        "api_port": 8080,
        "idle_stop_minutes": 60,
        "gpu": False,
    }
    return cloud_init.render_user_data(**{**values, **overrides})


def test_rendered_user_data_passes_cloud_init_schema(tmp_path):
    exe = shutil.which("cloud-init")
    if exe is None:
        pytest.skip("cloud-init is not installed (apt-get install cloud-init)")
    for gpu in (False, True):
        path = tmp_path / f"user-data-{gpu}.yaml"
        path.write_text(render(gpu=gpu))
        result = subprocess.run(
            [exe, "schema", "--config-file", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Valid cloud-config" in result.stdout


@pytest.mark.parametrize("script", cloud_init.SHELL_SCRIPTS, ids=lambda p: p.name)
def test_vm_scripts_pass_shellcheck(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([exe, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


UNITS = [(src, dest) for src, dest, _ in cloud_init.STATIC_FILES if "/systemd/" in dest]


def test_systemd_units_are_well_formed(tmp_path):
    """Parsed here always; where systemd is installed, `systemd-analyze verify` checks them too."""
    shipped = {dest: src for src, dest, _ in cloud_init.STATIC_FILES}
    for src, _ in UNITS:
        unit = configparser.ConfigParser(interpolation=None, strict=True)
        unit.optionxform = str  # systemd keys are case-sensitive
        unit.read_string((cloud_init.VM_DIR / src).read_text())
        assert unit["Unit"]["Description"].startswith("tinycloud: "), src
        if src.endswith(".service"):
            command = unit["Service"]["ExecStart"].split()[0]
            assert command in shipped, f"{src} runs {command}, which cloud-init does not write"
        else:
            assert unit["Install"]["WantedBy"] == "timers.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    scripts = {}
    for name in ("tinycloud-idle", "tinycloud-cap"):
        scripts[name] = tmp_path / name
        scripts[name].write_text((cloud_init.VM_DIR / f"{name}.sh").read_text())
        scripts[name].chmod(0o755)
    for src, _ in UNITS:
        text = (cloud_init.VM_DIR / src).read_text()
        for name, script in scripts.items():
            text = text.replace(f"/usr/local/sbin/{name} ", f"{script} ")
        (tmp_path / src).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / src) for src, _ in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even on unknown keys or bad values; it only says so: demand silence.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_user_data_ships_exactly_the_checked_files():
    config = yaml.safe_load(render())
    files = {f["path"]: f for f in config["write_files"]}
    for src, dest, mode in cloud_init.STATIC_FILES:
        assert cloud_init.unpacked(files[dest]) == (cloud_init.VM_DIR / src).read_text()
        assert files[dest]["permissions"] == mode
        assert files[dest]["encoding"] == "gz+b64"  # a third of the room: EC2 allows 16 KB
    assert render() == render(), "the same files must render the same user data (no gzip mtime)"
    assert "/usr/local/sbin/tinycloud-cap" in files
    assert config["runcmd"] == [["/usr/local/sbin/tinycloud-bootstrap"]]
    assert render().startswith("#cloud-config\n")
    # Room to grow, but EC2 refuses user data over 16 KB: keep an eye on it here.
    assert len(render().encode()) < cloud_init.USER_DATA_LIMIT * 3 // 4


def test_keys_and_values_survive_yaml_exactly():
    config = yaml.safe_load(render(api_port=9001, idle_stop_minutes=0, gpu=True, max_run_hours=7))
    assert config["ssh_keys"] == {"ed25519_private": PRIVATE, "ed25519_public": PUBLIC}
    env = next(f for f in config["write_files"] if f["path"] == cloud_init.IDLE_ENV)["content"]
    assert "TINYCLOUD_API_PORT=9001\n" in env
    assert "TINYCLOUD_IDLE_MINUTES=0\n" in env
    assert "TINYCLOUD_GPU=1\n" in env
    assert "TINYCLOUD_MAX_RUN_HOURS=7\n" in env
    assert f"TINYCLOUD_RUNS={VM_RUNS_DIR}\n" in env
    for package in ("python3-venv", "nftables", "jq"):
        assert package in config["packages"]
    assert config["package_update"] is True and config["package_upgrade"] is True


def test_render_refuses_keys_in_the_wrong_shape():
    with pytest.raises(ValueError, match="OpenSSH private key"):
        render(host_private_key="not a key")
    with pytest.raises(ValueError, match="ssh-ed25519"):
        render(host_public_key="ssh-rsa AAAA")


def test_module_renders_a_standalone_document():
    result = subprocess.run(
        [sys.executable, "-m", "infra.cloud_init"],
        capture_output=True,
        text=True,
        cwd=cloud_init.VM_DIR.parent.parent,
        check=True,
    )
    assert yaml.safe_load(result.stdout)["ssh_keys"]["ed25519_public"].startswith("ssh-ed25519")


# --- the idle auto-stop, run for real against stand-in system tools -----------------------------

FAKE_TOOLS = {
    # nft: `list` prints the counters file, `-f -` records the ruleset it was given.
    "nft": 'if [ "$1" = "-f" ]; then cat >"$FAKE/ruleset"; else cat "$FAKE/counters"; fi',
    # ss: the SSH query and the API query answer from separate files.
    "ss": 'case "$*" in *":22 "*) cat "$FAKE/ssh";; *) cat "$FAKE/api";; esac',
    "who": 'cat "$FAKE/who"',
    "systemctl": 'echo "$*" >>"$FAKE/systemctl.log"',
    "logger": 'echo "$*" >>"$FAKE/logger.log"',
}


def counters(ssh: int, api: int) -> str:
    return (
        "table inet tinycloud {\n\tchain activity {\n"
        "\t\ttype filter hook prerouting priority raw; policy accept;\n"
        f"\t\ttcp dport 22 counter packets {ssh} bytes {ssh * 60}\n"
        f"\t\ttcp dport 8080 counter packets {api} bytes {api * 60}\n\t}}\n}}\n"
    )


class Vm:
    """A temp dir standing in for the VM: state dir, runs dir, env file and fake tools."""

    def __init__(self, root: Path, idle_minutes: int = 60, max_run_hours: int = 0) -> None:
        self.extra_env: dict[str, str] = {}
        self.fake = root / "fake"
        self.bin = root / "bin"
        self.state = root / "state"
        self.runs = root / "runs"
        for d in (self.fake, self.bin, self.state, self.runs):
            d.mkdir()
        self.env_file = root / "idle.env"
        self.env_file.write_text(
            cloud_init.idle_env(
                api_port=8080,
                idle_stop_minutes=idle_minutes,
                gpu=False,
                max_run_hours=max_run_hours,
            )
            .replace(VM_RUNS_DIR, str(self.runs))
            .replace(VM_STATE_DIR, str(self.state))
        )
        for name, body in FAKE_TOOLS.items():
            self.tool(name, body)
        self.set(counters=counters(0, 0), ssh="", api="", who="")

    def tool(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)

    def set(self, **files: str) -> None:
        for name, text in files.items():
            (self.fake / name).write_text(text)

    def run(self, script: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "PATH": f"{self.bin}:{path or os.environ['PATH']}",
            "FAKE": str(self.fake),
            "TINYCLOUD_IDLE_ENV": str(self.env_file),
            "TINYCLOUD_SYSTEM_ENV": str(self.fake / "environment"),
            **self.extra_env,
        }
        return subprocess.run(
            [BASH, str(script), *args], env=env, capture_output=True, text=True, timeout=30
        )

    def idle_for(self, minutes: float) -> None:
        stamp = time.time() - minutes * 60
        os.utime(self.state / "last-activity", (stamp, stamp))

    def systemctl(self) -> str:
        log = self.fake / "systemctl.log"
        return log.read_text() if log.exists() else ""

    def add_run(self, name: str, status: str, pid: int) -> None:
        (self.runs / name).mkdir()
        (self.runs / name / "run.json").write_text(f'{{"status": "{status}", "pid": {pid}}}')


@pytest.fixture
def vm(tmp_path) -> Vm:
    vm = Vm(tmp_path)
    started = vm.run(IDLE_SCRIPT, "start")
    assert started.returncode == 0, started.stderr
    return vm


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_start_counts_ssh_and_api_packets_and_resets_the_clock(vm):
    ruleset = (vm.fake / "ruleset").read_text()
    assert "hook prerouting priority -300" in ruleset
    assert "tcp dport 22 counter" in ruleset and "tcp dport 8080 counter" in ruleset
    assert "delete table inet tinycloud" in ruleset  # idempotent re-creation
    assert time.time() - (vm.state / "last-activity").stat().st_mtime < 60


def test_idle_past_the_limit_powers_off(vm):
    vm.idle_for(61)
    result = vm.run(IDLE_SCRIPT, "check")
    assert result.returncode == 0, result.stderr
    assert vm.systemctl() == "poweroff\n"
    assert "powering off" in (vm.fake / "logger.log").read_text()


def test_idle_below_the_limit_waits(vm):
    vm.idle_for(30)
    result = vm.run(IDLE_SCRIPT, "check")
    assert vm.systemctl() == ""
    assert "idle for 30 of 60 min" in result.stdout


@pytest.mark.parametrize(
    "activity",
    ["live job", "packets", "ssh session", "logged-in user", "api connection", "keep-awake"],
)
def test_any_activity_keeps_the_vm_up_and_resets_the_clock(vm, activity):
    vm.idle_for(120)
    if activity == "live job":
        vm.add_run("finetune-1", "running", os.getpid())
    elif activity == "packets":
        vm.set(counters=counters(0, 3))  # three API packets since the last check
    elif activity == "ssh session":
        vm.set(ssh="ESTAB 0 0 172.31.5.9:22 198.51.100.7:50122\n")
    elif activity == "logged-in user":
        vm.set(who="ubuntu pts/0 2026-11-24 05:00 (198.51.100.7)\n")
    elif activity == "api connection":
        vm.set(api="ESTAB 0 0 172.31.5.9:8080 198.51.100.7:50123\n")
    else:
        (vm.state / "keep-awake").touch()
    result = vm.run(IDLE_SCRIPT, "check")
    assert result.returncode == 0, result.stderr
    assert "busy:" in result.stdout
    assert vm.systemctl() == ""
    assert time.time() - (vm.state / "last-activity").stat().st_mtime < 60


def test_killed_or_finished_jobs_do_not_keep_the_vm_up(vm):
    vm.add_run("pretrain-killed", "running", dead_pid())  # SIGKILL leaves "running" behind
    vm.add_run("finetune-done", "completed", os.getpid())
    vm.idle_for(61)
    vm.run(IDLE_SCRIPT, "check")
    assert vm.systemctl() == "poweroff\n"


def test_packets_count_only_once(vm):
    vm.set(counters=counters(5, 0))
    vm.idle_for(120)
    assert "busy: SSH/API traffic (5 packets)" in vm.run(IDLE_SCRIPT, "check").stdout
    vm.idle_for(61)  # no new packets since: idle again
    vm.run(IDLE_SCRIPT, "check")
    assert vm.systemctl() == "poweroff\n"


def test_zero_minutes_never_stops(tmp_path):
    vm = Vm(tmp_path, idle_minutes=0)
    vm.run(IDLE_SCRIPT, "start")
    vm.idle_for(10_000)
    assert vm.run(IDLE_SCRIPT, "check").returncode == 0
    assert vm.systemctl() == ""


def test_unknown_subcommand_is_a_usage_error(vm):
    result = vm.run(IDLE_SCRIPT, "stop-now")
    assert result.returncode == 2 and "usage" in result.stderr


# --- the bootstrap ------------------------------------------------------------------------------


BOOTSTRAP_REAL_TOOLS = ("cat", "date", "dirname", "grep", "mkdir")


class BootstrapVm(Vm):
    """Only stand-ins and a few harmless real tools on PATH, so this machine's own Docker
    (or its absence) cannot decide which branch the script takes."""

    def __init__(self, root: Path, idle_minutes: int) -> None:
        super().__init__(root, idle_minutes=idle_minutes)
        for name in ("apt-get", "usermod", "uv"):
            self.tool(name, f'echo "{name} $*" >>"$FAKE/calls.log"')
        # `install -d -o ubuntu ...` needs root and the user: make the directories only.
        self.tool("install", 'for a in "$@"; do case "$a" in /*) mkdir -p "$a";; esac; done')
        self.real = root / "real"
        self.real.mkdir()
        for name in BOOTSTRAP_REAL_TOOLS:
            (self.real / name).symlink_to(shutil.which(name))

    def bootstrap(self) -> subprocess.CompletedProcess:
        return self.run(BOOTSTRAP, path=str(self.real))

    def calls(self) -> str:
        return (self.fake / "calls.log").read_text()


def bootstrap_vm(root: Path, idle_minutes: int) -> BootstrapVm:
    return BootstrapVm(root, idle_minutes)


def test_bootstrap_installs_docker_enables_the_timer_and_marks_ready(tmp_path):
    vm = bootstrap_vm(tmp_path, idle_minutes=60)
    result = vm.bootstrap()
    assert result.returncode == 0, result.stderr
    calls = vm.calls()
    assert (
        "apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends docker.io" in calls
    )
    assert "usermod -aG docker ubuntu" in calls
    assert "enable --now tinycloud-idle.timer" in vm.systemctl()
    assert "enable --now tinycloud-cap.timer" in vm.systemctl()
    assert vm.runs.is_dir()
    assert (vm.fake / "environment").read_text() == f"TINYCLOUD_RUNS={vm.runs}\n"
    assert (vm.state / "ready").read_text().startswith("20")
    again = vm.bootstrap()  # safe to run twice: no duplicate environment line
    assert again.returncode == 0 and (vm.fake / "environment").read_text().count("\n") == 1


def test_bootstrap_keeps_the_images_docker_and_can_skip_the_timer(tmp_path):
    vm = bootstrap_vm(tmp_path, idle_minutes=0)
    vm.tool("docker", "exit 0")  # the Deep Learning AMI ships Docker with the NVIDIA runtime
    assert vm.bootstrap().returncode == 0
    assert "apt-get" not in vm.calls()
    assert "tinycloud-idle.timer" not in vm.systemctl()
    assert "enable --now tinycloud-activity.service" in vm.systemctl()
    assert "enable --now tinycloud-cap.timer" in vm.systemctl()  # the boot log, cap or not


def test_failed_bootstrap_never_marks_ready(tmp_path):
    vm = bootstrap_vm(tmp_path, idle_minutes=60)
    vm.tool("apt-get", "echo 'E: Unable to locate package docker.io' >&2; exit 100")
    result = vm.bootstrap()
    assert result.returncode == 100
    assert not (vm.state / "ready").exists()


# --- the run-time cap and the boot log, run for real against stand-in system tools ---------------

CAP_SCRIPT = cloud_init.VM_DIR / "tinycloud-cap.sh"
HOUR = 3600

# A job as the cap sees one: its own session and process group (as `fab train` starts it), a
# child in that group (as torchrun's workers are), run.json saying running. On SIGTERM it does
# what the real jobs do: writes its checkpoint, marks itself interrupted, exits 143.
JOB = """
import json, os, signal, subprocess, sys, time
run_dir, mode = sys.argv[1], sys.argv[2]
child = subprocess.Popen(["sleep", "600"])
def meta(status):
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"status": status, "pid": os.getpid(), "child": child.pid}, f)
def stop(signum, frame):
    open(os.path.join(run_dir, "ckpt.pt"), "w").write("saved")
    meta("interrupted")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop if mode == "checkpoint" else signal.SIG_IGN)
meta("running")
while True:
    time.sleep(0.05)
"""


class CapVm(Vm):
    """The stand-in VM with a clock: its uptime and boot id are files the test sets."""

    def __init__(self, root: Path, max_run_hours: int) -> None:
        super().__init__(root, max_run_hours=max_run_hours)
        self.extra_env = {
            "TINYCLOUD_UPTIME_FILE": str(self.fake / "uptime"),
            "TINYCLOUD_BOOT_ID_FILE": str(self.fake / "boot_id"),
            "TINYCLOUD_CAP_GRACE_S": "20",
        }
        self.boot("boot-one", uptime_s=60)
        self.jobs: list[subprocess.Popen] = []

    def boot(self, boot_id: str, uptime_s: float) -> None:
        self.set(boot_id=f"{boot_id}\n", uptime=f"{uptime_s:.2f} 12.00\n")

    def check(self) -> subprocess.CompletedProcess:
        return self.run(CAP_SCRIPT, "check")

    def boots(self) -> list[list[str]]:
        return [line.split() for line in (self.state / "boots.log").read_text().splitlines()]

    def start_job(self, name: str, mode: str = "checkpoint") -> tuple[subprocess.Popen, Path]:
        run_dir = self.runs / name
        run_dir.mkdir()
        job = subprocess.Popen(
            [sys.executable, "-c", JOB, str(run_dir), mode], start_new_session=True
        )
        self.jobs.append(job)
        deadline = time.monotonic() + 30
        while not (run_dir / "run.json").exists():
            assert time.monotonic() < deadline, "the stand-in job never started"
            time.sleep(0.05)
        return job, run_dir

    def cleanup(self) -> None:
        for job in self.jobs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.fixture
def cap_vm(tmp_path):
    vm = CapVm(tmp_path, max_run_hours=12)
    yield vm
    vm.cleanup()


def test_cap_logs_each_boot_and_waits_below_the_limit(cap_vm):
    before = int(time.time())
    result = cap_vm.check()
    assert result.returncode == 0, result.stderr
    assert "up 1 of 720 min" in result.stdout
    assert cap_vm.systemctl() == ""
    [(boot_id, start, seen)] = cap_vm.boots()
    assert boot_id == "boot-one" and before - 62 <= int(start) <= before - 58
    assert before <= int(seen) <= before + 5
    cap_vm.boot("boot-one", uptime_s=3 * HOUR)  # the same boot, later: one line, updated
    cap_vm.check()
    [(_, _, later)] = cap_vm.boots()
    assert int(later) >= int(seen)
    cap_vm.boot("boot-two", uptime_s=90)  # stopped and started again: a second line
    cap_vm.check()
    assert [b[0] for b in cap_vm.boots()] == ["boot-one", "boot-two"]
    assert oct((cap_vm.state / "boots.log").stat().st_mode & 0o777) == "0o644"  # fab reads it


def test_cap_reached_checkpoints_every_job_then_powers_off(cap_vm):
    job, run_dir = cap_vm.start_job("forgotten")
    child = json.loads((run_dir / "run.json").read_text())["child"]
    cap_vm.add_run("finished", "completed", os.getpid())  # not a job to stop: not running
    cap_vm.boot("boot-one", uptime_s=12 * HOUR + 30)
    result = cap_vm.check()
    assert result.returncode == 0, result.stderr
    assert job.wait(10) == 143, "the job did not get its SIGTERM"
    assert (run_dir / "ckpt.pt").read_text() == "saved"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    assert cap_vm.systemctl() == "poweroff\n"
    logged = (cap_vm.fake / "logger.log").read_text()
    assert "the cap is 12 h (maxRunHours): stopping" in logged
    assert f"asking job group {job.pid} to checkpoint" in logged
    assert logged.index("asking job group") < logged.index("powering off")


def test_cap_powers_off_after_the_grace_even_if_a_job_ignores_sigterm(cap_vm):
    cap_vm.extra_env["TINYCLOUD_CAP_GRACE_S"] = "2"
    job, _ = cap_vm.start_job("stubborn", mode="ignore")
    cap_vm.boot("boot-one", uptime_s=13 * HOUR)
    started = time.monotonic()
    result = cap_vm.check()
    assert result.returncode == 0, result.stderr
    assert 2 <= time.monotonic() - started < 15
    assert job.poll() is None, "the cap waits, it does not kill: poweroff does the rest"
    assert cap_vm.systemctl() == "poweroff\n"


def test_zero_hours_is_no_cap_but_still_a_boot_log(tmp_path):
    vm = CapVm(tmp_path, max_run_hours=0)
    vm.boot("boot-one", uptime_s=1000 * HOUR)
    assert vm.check().returncode == 0
    assert vm.systemctl() == ""
    assert vm.boots()[0][0] == "boot-one"
