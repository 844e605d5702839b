"""examples/radon.py runs and lands on the empirical-Bayes optimum (tau ~ 0.127)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "radon.py"


def test_radon_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("radon_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = module.main()
    out = capsys.readouterr().out
    assert "county 1" in out and "116 houses" in out
    assert abs(float(params["tau"]) - 0.1272) < 1e-3
    assert abs(float(params["mu"]) - 1.3916) < 1e-3
