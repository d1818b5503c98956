"""infra/cloud_init.py and the scripts in infra/vm/: valid cloud-config, clean shell, and the
idle auto-stop and bootstrap logic run for real with the system tools they call (nft, ss, who,
systemctl, apt-get, ...) replaced by recording stand-ins on PATH.
"""

from __future__ import annotations

import configparser
import os
import shutil
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
    script = tmp_path / "tinycloud-idle"
    script.write_text((cloud_init.VM_DIR / "tinycloud-idle.sh").read_text())
    script.chmod(0o755)
    for src, _ in UNITS:
        text = (cloud_init.VM_DIR / src).read_text()
        (tmp_path / src).write_text(text.replace("/usr/local/sbin/tinycloud-idle", str(script)))
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
        assert files[dest]["content"] == (cloud_init.VM_DIR / src).read_text()
        assert files[dest]["permissions"] == mode
    assert config["runcmd"] == [["/usr/local/sbin/tinycloud-bootstrap"]]
    assert render().startswith("#cloud-config\n")
    # Room to grow, but EC2 refuses user data over 16 KB: keep an eye on it here.
    assert len(render().encode()) < cloud_init.USER_DATA_LIMIT * 3 // 4


def test_keys_and_values_survive_yaml_exactly():
    config = yaml.safe_load(render(api_port=9001, idle_stop_minutes=0, gpu=True))
    assert config["ssh_keys"] == {"ed25519_private": PRIVATE, "ed25519_public": PUBLIC}
    env = next(f for f in config["write_files"] if f["path"] == cloud_init.IDLE_ENV)["content"]
    assert "TINYCLOUD_API_PORT=9001\n" in env
    assert "TINYCLOUD_IDLE_MINUTES=0\n" in env
    assert "TINYCLOUD_GPU=1\n" in env
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

    def __init__(self, root: Path, idle_minutes: int = 60) -> None:
        self.fake = root / "fake"
        self.bin = root / "bin"
        self.state = root / "state"
        self.runs = root / "runs"
        for d in (self.fake, self.bin, self.state, self.runs):
            d.mkdir()
        self.env_file = root / "idle.env"
        self.env_file.write_text(
            cloud_init.idle_env(api_port=8080, idle_stop_minutes=idle_minutes, gpu=False)
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


def test_failed_bootstrap_never_marks_ready(tmp_path):
    vm = bootstrap_vm(tmp_path, idle_minutes=60)
    vm.tool("apt-get", "echo 'E: Unable to locate package docker.io' >&2; exit 100")
    result = vm.bootstrap()
    assert result.returncode == 100
    assert not (vm.state / "ready").exists()
