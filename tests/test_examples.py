"""The examples run: their models and task generators through a short fit."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import torch

from hierbayes.inference import fit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_logistic_regression_example_fits_and_predicts() -> None:
    example = load("logistic_regression")
    train, test = example.tasks(40, seed=0), example.tasks(10, seed=1)  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short runs: the mode search may not finish
        result = fit(
            example.model,  # type: ignore[attr-defined]
            train,
            method="llama",
            objective="evidence",
            curvature="ggn",
            meta_steps=20,
            meta_batch_size=10,
            lr=0.05,
            step_size=0.1,
            progress=False,
        )
        prediction = result.adapt(test).predict(test.query_x)
    probs = prediction.mean
    assert probs.shape == test.query_y.shape[:2] or probs.shape == test.query_y.shape
    assert bool(((probs >= 0) & (probs <= 1)).all())
    assert bool(torch.isfinite(result.params["mu"]).all())
