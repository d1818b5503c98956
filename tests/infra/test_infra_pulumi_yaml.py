"""Pulumi.yaml declares the project as infra/config.py reads it: same keys, types, defaults;
and the facts infra repeats from other areas (it may import none of them) still agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from infra import config

ROOT = Path(__file__).resolve().parents[2]
TYPES = {bool: "boolean", int: "integer", str: "string", list: "array"}


def project() -> dict:
    return yaml.safe_load((ROOT / "Pulumi.yaml").read_text())


def test_project_runs_infra_with_uv():
    p = project()
    assert p["name"] == config.NAMESPACE
    assert p["runtime"] == {"name": "python", "options": {"toolchain": "uv"}}
    assert p["main"] == "infra/"
    assert (ROOT / p["main"] / "__main__.py").is_file()


def test_every_key_is_declared_with_its_type_description_and_default():
    declared = project()["config"]
    assert set(declared) == set(config.DEFAULTS)
    for name, default in config.DEFAULTS.items():
        entry = declared[name]
        assert entry["type"] == TYPES[type(default)], name
        assert entry["default"] == default, name
        assert len(entry["description"]) > 20, name
        if entry["type"] == "array":
            assert entry["items"] == {"type": "string"}


def test_docs_table_lists_every_key():
    docs = (ROOT / "docs" / "infra.md").read_text()
    for name in config.DEFAULTS:
        assert f"| `{name}` |" in docs, name


def test_default_api_port_is_the_servers():
    """infra stands alone (it cannot import serving/), so this test keeps the two in step."""
    from serving.constants import DEFAULT_PORT

    assert config.DEFAULTS["apiPort"] == DEFAULT_PORT


def test_vm_paths_are_the_ones_fab_expects(monkeypatch):
    """cloud-init makes what `fab setup` waits for and writes into: same marker, user, runs."""
    from infra import cloud_init
    from remote import boot, settings

    monkeypatch.delenv("TINYCLOUD_READY_MARKER", raising=False)
    assert boot.ready_marker() == cloud_init.READY_MARKER
    assert cloud_init.SSH_USER == settings.DEFAULT_USER
    remote_runs = f"{cloud_init.HOME_DIR}/{settings.DEFAULT_REMOTE_DIR}/{settings.RUNS_DIR}"
    assert remote_runs == cloud_init.RUNS_DIR
