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


@pytest.mark.parametrize("family", ["studentt", "binomial", "categorical"])
def test_the_siblings_take_the_same_targets(family: str) -> None:
    """The other roads a prediction takes (NUTS draws, mean-field VI, the hyper-Laplace
    mixture, the comparison, ArviZ) take the (T, N, 1) targets too."""
    from hierbayes.inference.diagnostics import compare_approximations, to_inference_data
    from hierbayes.inference.posteriors import hyper_laplace
    from hierbayes.inference.references import meanfield_vi, nuts_pyro

    tasks = family_tasks(family, T=3)
    model = family_program(family)
    result, _ = _fit(family, "evidence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains: R-hat flags; not what is tested here
        nuts = nuts_pyro(model, result.params, tasks, num_warmup=30, num_samples=30, num_chains=2)
        meanfield = meanfield_vi(model, result.params, tasks, num_steps=30)
        hyper = hyper_laplace(result, tasks).task_posteriors
        table = compare_approximations(
            {"laplace": result.adapt(tasks), "meanfield": meanfield, "hyper": hyper, "nuts": nuts},
            tasks,
        )
        idata = to_inference_data(nuts, tasks)
    for row in table.table.values():
        assert row["lpd"] is not None and torch.isfinite(torch.tensor(row["lpd"]))
    assert idata.observed_data["y"].shape[:2] == tasks.query_y.shape[:2]
