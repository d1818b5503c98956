"""infra/prices.py: the estimate adds up, and a type outside the table says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra import config, prices


def test_known_type_adds_instance_volume_and_ip():
    cost = prices.estimate("m5.large", 100)
    assert cost["instance_usd"] == 0.096
    assert cost["volume_usd"] == pytest.approx(100 * 0.08 / 730, abs=1e-4)
    assert cost["running_usd"] == pytest.approx(0.096 + cost["volume_usd"] + 0.005, abs=1e-4)
    assert cost["stopped_usd"] == pytest.approx(cost["volume_usd"] + 0.005, abs=1e-4)
    assert cost["prices_as_of"] == prices.PRICES_AS_OF
    assert "$0.112/hour while running" in cost["summary"]
    assert prices.PRICES_AS_OF in cost["summary"]


def test_unknown_type_says_so_and_still_prices_the_rest():
    cost = prices.estimate("x2iedn.32xlarge", 100)
    assert cost["instance_usd"] is None and cost["running_usd"] is None
    assert "x2iedn.32xlarge is not in tinycloud's price table" in cost["summary"]
    assert prices.PRICING_URL in cost["summary"]
    assert cost["stopped_usd"] > 0


def test_the_default_types_have_prices():
    for instance_type in (config.CPU_INSTANCE_TYPE, config.GPU_INSTANCE_TYPE):
        assert prices.estimate(instance_type, 100)["running_usd"] is not None


def test_module_prints_json():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "infra.prices", "g4dn.xlarge", "100"],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    assert json.loads(result.stdout)["instance_usd"] == 0.526
