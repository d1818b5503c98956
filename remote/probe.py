"""Report every run and the host's health as one JSON document. Runs ON the host.

    python3 remote/probe.py ~/tinycloud/runs [SETTINGS BOOT_LOG]   # what `fab status` reads

Standard library and ``facts.py`` only: `fab` sends this file's source, with ``facts.py``
bundled in front (``launch.probe_script``), to the host's ``python3 -c``, so it works before
(and without) the job environment or any code on the host. Progress comes from ``run.json``
alone, as the job contract says; a run whose ``run.json`` says ``running`` but whose process is
gone was killed (SIGKILL, OOM, a reboot) and is reported as ``killed``. A live run's time and
cost are brought up to now from its last ``run.json`` write. The host part adds the uptime, the
VM's boot log and its run-time cap, where the tinycloud VM has them (SETTINGS, BOOT_LOG).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from facts import (
    ADAPTER_DIR,
    MANIFEST,
    MAX_RUN_HOURS_ENV,
    MODEL_DIR,
    PID_FILE,
    RUN_JSON,
    RUNS_DIR_NAME,
    VM_BOOT_LOG,
    VM_SETTINGS,
    RunKey,
    RunState,
)

RUN_KEYS = ("job", "loss", "eta_s", "started_at", "finished_at", "updated_at", "status")


def pid_alive(pid: int | None) -> bool:
    """True while the process exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill -0 is all we have
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def model_complete(model_dir: Path) -> bool:
    """A whole save_pretrained directory: config, weights and tokenizer. The jobs write model/
    atomically (rundir.atomic_dir), so one that has all three is not half-written."""
    return (
        (model_dir / "config.json").is_file()
        and any((model_dir / name).is_file() for name in WEIGHTS)
        and (model_dir / "tokenizer_config.json").is_file()
    )


def run_info(run_dir: Path) -> dict:
    try:
        meta = json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        meta = {}
    launcher = read_pid(run_dir / PID_FILE)
    writer_alive = pid_alive(meta.get("pid"))  # run.json is the live process's own
    alive = pid_alive(launcher) or writer_alive
    status = meta.get("status")
    if alive and not writer_alive:
        state = "starting"  # importing torch; run.json (if any) is an earlier attempt's
    elif alive:
        state = "finishing" if status == RunState.COMPLETED else status or RunState.RUNNING
    elif status == RunState.RUNNING:
        state = "killed"
    else:
        state = status or "failed to start"
    info = {k: meta.get(k) for k in (*RUN_KEYS, *RunKey)}
    if alive and status == RunState.RUNNING:
        _bring_up_to_now(info)
    return {
        **info,
        "name": run_dir.name,
        "state": state,
        "alive": alive,
        "pid": launcher if pid_alive(launcher) else meta.get("pid"),
        # only a finished run's model is served: not a failed run's leftover config files
        "has_model": status == RunState.COMPLETED and model_complete(run_dir / MODEL_DIR),
        "has_manifest": (run_dir / MANIFEST).is_file(),
        # what `fab serve --run A --run B --with-base` needs: the model a fine-tune started
        # from (its --model, as typed) and whether its model/ keeps a LoRA adapter
        "base": (meta.get("args") or {}).get("model") if meta.get("job") != "pretrain" else None,
        "lora": (run_dir / MODEL_DIR / ADAPTER_DIR / "adapter_config.json").is_file(),
    }


def _bring_up_to_now(info: dict) -> None:
    """A running job rewrites run.json every log step; add the seconds since its last write."""
    elapsed = info.get(RunKey.ELAPSED_S)
    try:
        written = datetime.strptime(info["updated_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        written = None
    if elapsed is None or written is None:
        return  # a job that records no time yet: show what run.json says
    info[RunKey.ELAPSED_S] = elapsed + max(0.0, time.time() - written)
    rate = info.get(RunKey.COST_PER_HOUR_USD)
    if rate is not None:
        info[RunKey.COST_USD] = rate * info[RunKey.ELAPSED_S] / 3600


def host_info(root: Path) -> dict:
    info: dict = {"cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["load"] = list(os.getloadavg())
    try:
        mem = dict(
            (line.split(":")[0], int(line.split()[1]) * 1024)
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.split(":")[0] in ("MemTotal", "MemAvailable")
        )
        info["mem_total"], info["mem_available"] = mem["MemTotal"], mem["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    usage = shutil.disk_usage(root if root.exists() else Path.home())
    info["disk_total"], info["disk_free"] = usage.total, usage.free
    with contextlib.suppress(OSError, ValueError, IndexError):
        info["uptime_s"] = machine_uptime()
    info["now"] = time.time()
    return info


def machine_uptime() -> float:
    """Seconds since this machine's init (PID 1) started, as tinycloud-cap counts them: on a
    VM, /proc/uptime to a second or two; in a container, its own time, where /proc/uptime is
    the host's."""
    up = float(Path("/proc/uptime").read_text().split()[0])
    try:
        fields = Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()  # after "1 (comm)"
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime: ticks after boot
    except (OSError, IndexError, ValueError):  # /proc mounted hidepid: on a VM they agree
        return up
    return max(0.0, up - started)


def vm_info(settings: Path, boot_log: Path) -> dict:
    """The cap in force (the VM's settings file) and every boot the VM has recorded."""
    info: dict = {}
    with contextlib.suppress(OSError, ValueError):
        for line in settings.read_text().splitlines():
            name, _, value = line.partition("=")
            if name.strip() == MAX_RUN_HOURS_ENV:
                info["max_run_hours"] = int(value.strip().strip("'\""))
    with contextlib.suppress(OSError):
        boots = []
        for line in boot_log.read_text().splitlines():
            fields = line.split()
            with contextlib.suppress(ValueError, IndexError):
                boots.append([int(fields[1]), int(fields[2])])
        info["boots"] = boots
    return info


def main(argv: list[str]) -> None:
    root = Path(argv[0]).expanduser() if argv else Path(RUNS_DIR_NAME)
    settings = Path(argv[1] if len(argv) > 1 else VM_SETTINGS)
    boot_log = Path(argv[2] if len(argv) > 2 else VM_BOOT_LOG)
    dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    runs = [run_info(d) for d in dirs if (d / RUN_JSON).exists() or (d / PID_FILE).exists()]
    host = {**host_info(root), **vm_info(settings, boot_log)}
    json.dump({"runs": runs, "host": host}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
