"""Report every run and the host's health as one JSON document. Runs ON the host.

    python3 remote/probe.py ~/tinycloud/runs          # what `fab status` and `fab runs` read

Standard library and ``facts.py`` only: `fab` sends this file's source, with ``facts.py``
bundled in front (``launch.probe_script``), to the host's ``python3 -c``, so it works before
(and without) the job environment or any code on the host. Progress comes from ``run.json``
alone, as the job contract says; a run whose ``run.json`` says ``running`` but whose process is
gone was killed (SIGKILL, OOM, a reboot) and is reported as ``killed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from facts import MANIFEST, MODEL_DIR, PID_FILE, RUN_JSON, RUNS_DIR_NAME, RunState


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
    return {
        **{
            k: meta.get(k)
            for k in (
                "job",
                "step",
                "max_steps",
                "loss",
                "tokens_per_s",
                "eta_s",
                "started_at",
                "finished_at",
                "updated_at",
                "status",
            )
        },
        "name": run_dir.name,
        "state": state,
        "alive": alive,
        "pid": launcher if pid_alive(launcher) else meta.get("pid"),
        # only a finished run's model is served: not a failed run's leftover config files
        "has_model": status == RunState.COMPLETED and model_complete(run_dir / MODEL_DIR),
        "has_manifest": (run_dir / MANIFEST).is_file(),
    }


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
    return info


def main(argv: list[str]) -> None:
    root = Path(argv[0]).expanduser() if argv else Path(RUNS_DIR_NAME)
    dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    runs = [run_info(d) for d in dirs if (d / RUN_JSON).exists() or (d / PID_FILE).exists()]
    json.dump({"runs": runs, "host": host_info(root)}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
