"""Targets shaped (T, N, 1) through every family and objective (issue 19, break 1).

A plain Pyro program that observes ``y[..., 0]`` scores ``(T, N)`` values of targets a user
gives as ``(T, N, 1)``. Meta-training, ``evaluate`` and ``predict(...).log_prob`` must take
them for every family the README lists, and the predictive must score exactly what the program
itself scores (checked against an independent trace of the program at the adapted point).
"""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from torch.testing import assert_close

from hierbayes.inference import fit
from tests.programs import FAMILIES, family_program, family_tasks

OBJECTIVES = ("maml", "predictive", "evidence", "paper")


def _fit(family: str, objective: str):  # type: ignore[no-untyped-def]
    tasks = family_tasks(family)
    options = (
        {"method": "maml"} if objective == "maml" else {"method": "llama", "objective": objective}
    )
    with warnings.catch_warnings():
        # a 3-step run is not converged and its step may be rough: not what is tested here
        warnings.simplefilter("ignore")
        result = fit(
            family_program(family), tasks, meta_steps=3, step_size=0.05, progress=False, **options
        )
    return result, tasks


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("family", FAMILIES)
def test_targets_with_a_trailing_axis_train_evaluate_and_predict(
    family: str, objective: str
) -> None:
    result, tasks = _fit(family, objective)
    assert all(torch.isfinite(torch.tensor(result.history)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = result.evaluate(tasks)
        prediction = result.predict(tasks)
    assert metrics.nll.shape == (tasks.num_tasks,) and bool(torch.isfinite(metrics.nll).all())
    log_prob = prediction.log_prob(tasks.query_y)
    assert log_prob.shape == tasks.query_y.shape[:2]
    assert bool(torch.isfinite(log_prob).all())
    if family != "categorical":
        lower, upper = prediction.interval(0.9)
        assert lower.shape[:2] == tasks.query_y.shape[:2]
        assert bool((lower <= upper).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_point_mass_predictive_scores_what_the_program_scores(family: str) -> None:
    """MAML's predictive at phi-hat is the program's own observation site, so its log density
    of (T, N, 1) targets equals the program traced at phi-hat with obs=y[..., 0]."""
    result, tasks = _fit(family, "maml")
    posterior = result.adapt(tasks)
    got = result.predict(tasks).log_prob(tasks.query_y)
    data = dict(result.params)
    data["phi"] = posterior.mean.unsqueeze(1)  # the program's (T, 1, D) site value
    model = family_program(family)
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, data=data)).get_trace(
            tasks.query_x, tasks.query_y
        )
    site = trace.nodes["y"]
    expected = site["fn"].log_prob(site["value"])
    assert_close(got, expected)
    pyro.clear_param_store()
