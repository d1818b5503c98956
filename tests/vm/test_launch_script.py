"""launch_gpt2.sh against a real Docker engine: its `docker run` flags, env file, port mapping,
restart policy and health wait, as `fab serve --engine tgi` renders the script.

The engine is this machine's own dockerd in a network namespace (host_docker.py says why not
the booted VM's), the image a stand-in under TGI's name made offline (tgi_standin.py).
"""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest
import tgi_standin
from host_docker import host_docker
from host_docker import missing as no_docker
from vm_harness import SESSIONS

from facts import API_PORT
from remote.render import render_launch_script
from serving.constants import DEFAULT_CONTAINER_NAME, DEFAULT_IMAGE

pytestmark = pytest.mark.slow

API_KEY = "key-with-'quotes' and $dollars"  # must reach the container intact, and only there


def test_the_rendered_script_starts_tgi_on_a_real_engine(tiny_model_dir, tmp_path):
    why = no_docker() or tgi_standin.missing()
    if why:
        pytest.skip(why)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    script = tmp_path / "launch_gpt2.sh"  # what `fab serve --engine tgi` renders (tasks.py)
    script.write_text(
        render_launch_script(
            model_dir=str(tiny_model_dir),
            api_port=API_PORT,
            api_key=API_KEY,
            gpu=False,
            n_positions=config["n_positions"],
        )
    )
    script.chmod(0o700)
    home = tmp_path / "home"
    home.mkdir()
    with host_docker(SESSIONS) as engine:
        tar = tgi_standin.build_tar(tmp_path / "tgi-standin.tar")
        changes = [arg for c in tgi_standin.IMPORT_CHANGES for arg in ("--change", c)]
        imported = engine.docker("import", *changes, str(tar), DEFAULT_IMAGE)
        assert imported.returncode == 0, imported.stderr

        launched = engine.run_in_netns([str(script)], env={"HOME": str(home)}, timeout=300)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert f"TGI is up: http://127.0.0.1:{API_PORT}" in launched.stdout

        inspect = json.loads(engine.docker("inspect", DEFAULT_CONTAINER_NAME).stdout)[0]
        host = inspect["HostConfig"]
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert host["PortBindings"]["80/tcp"] == [{"HostIp": "", "HostPort": str(API_PORT)}]
        assert host["NanoCpus"] > 0 and host["ShmSize"] == 1024**3
        assert sorted(host["Binds"]) == sorted(
            [f"{tiny_model_dir}:/model", f"{home / 'tgi-data'}:/data"]
        )
        data = home / "tgi-data"
        n = config["n_positions"]
        assert (data / "tgi-args").read_text().split("\n")[:-1] == [
            "--model-id", "/model", "--max-input-tokens", str(n - 1),
            "--max-total-tokens", str(n), "--disable-custom-kernels",
            "--cors-allow-origin", "null",
        ]  # fmt: skip
        sent = hashlib.sha256(API_KEY.encode()).hexdigest()
        assert (data / "tgi-key.sha256").read_text().strip() == sent  # via the env file
        assert API_KEY not in json.dumps(inspect["Args"]) + json.dumps(inspect["Path"])
        health = engine.run_in_netns(
            ["curl", "-fsS", f"http://127.0.0.1:{API_PORT}/health"], env={}
        )
        assert health.returncode == 0 and health.stdout.strip() == "ok"

        again = engine.run_in_netns([str(script)], env={"HOME": str(home)}, timeout=300)
        assert again.returncode == 0, again.stderr
        assert f"replacing the existing {DEFAULT_CONTAINER_NAME} container" in again.stdout
        running = engine.docker("ps", "--format", "{{.Names}}").stdout.split()
        assert running == [DEFAULT_CONTAINER_NAME], shlex.join(running)
