"""Pulumi.yaml declares the project as infra/config.py reads it: same keys, types, defaults."""

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
