"""Plain Pyro programs with Bernoulli, Poisson and StudentT observations, end to end.

Each is a short ``model(x, y=None)``: theta a global sample site, phi in
``pyro.plate("tasks", T, dim=-2)``, observations in a nested ``pyro.plate("data", N, dim=-1)``.
They go through ``fit`` with MAML and with LLAMA (evidence objective, GGN and diagonal
curvature from the observation sites), ``adapt``, ``predict``, ``evaluate``; the predictives'
moments are checked against the observation families' known moments.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference import fit
from hierbayes.inference.diagnostics.metrics import evaluate_posterior
from hierbayes.inference.posteriors.base import PointMassPosterior
from hierbayes.inference.posteriors.laplace import laplace_posterior
from hierbayes.inference.predictions import DrawsPrediction
from hierbayes.models import PyroTaskDensity, model_structure
from hierbayes.tasks import TaskBatch

NU, T_SCALE = 5.0, 0.5


def _linear(x: Tensor, phi: Tensor) -> Tensor:
    return (x * phi[..., :2]).sum(-1) + phi[..., 2]


def logistic(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 3.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=_linear(x, phi)), obs=y)


def counts(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 3.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 0.5).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Poisson(torch.exp(0.5 * _linear(x, phi))), obs=y)


def robust(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 3.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.StudentT(NU, _linear(x, phi), T_SCALE), obs=y)


MODELS: dict[str, Callable[..., None]] = {
    "bernoulli": logistic,
    "poisson": counts,
    "studentt": robust,
}
TRUE_THETA = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)


def simulate(model: Callable[..., None], T: int = 8, N: int = 10, M: int = 12) -> TaskBatch:
    """Tasks drawn from the model at theta = TRUE_THETA: N support and M query points each."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, N + M, 2, generator=g)
    conditioned = pyro.poutine.condition(model, data={"theta": TRUE_THETA})
    with pyro.poutine.seed(rng_seed=4):
        y = pyro.poutine.trace(conditioned).get_trace(x).nodes["y"]["value"].detach()
    return TaskBatch(x[:, :N], y[:, :N], x[:, N:], y[:, N:])


CONFIGS = {
    "maml": {"method": "maml"},
    "llama-ggn": {"method": "llama", "objective": "evidence", "curvature": "ggn"},
    "llama-diag": {"method": "llama", "objective": "evidence", "curvature": "diag"},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_fit_adapt_predict_evaluate(family: str, config: str) -> None:
    model = MODELS[family]
    batch = simulate(model)
    with warnings.catch_warnings():
        # short runs may warn about the evidence objective's assumptions; not what is tested
        warnings.simplefilter("ignore", UserWarning)
        result = fit(
            model,
            batch,
            meta_steps=15,
            meta_batch_size=4,
            step_size=0.05,
            lr=1e-2,
            progress=False,
            **CONFIGS[config],
        )
    assert bool(torch.isfinite(result.params["theta"]).all())
    posterior = result.adapt(batch)
    prediction = posterior.predict(batch.query_x)
    assert prediction.mean.shape == batch.query_y.shape
    assert bool(torch.isfinite(prediction.log_prob(batch.query_y)).all())
    metrics = result.evaluate(batch)
    summary = metrics.summary()
    assert math.isfinite(summary["nll"]["mean"])
    assert math.isfinite(summary["mse"]["mean"])
    for level, covered in summary["coverage"].items():
        assert 0.0 <= covered <= 1.0, level
    if family == "bernoulli":
        assert 0.0 <= summary["accuracy"]["mean"] <= 1.0
    # the Laplace posterior's predictive samples phi: a mixture over draws
    if config != "maml":
        assert isinstance(prediction, DrawsPrediction)
        assert prediction.num_components > 1


# -- moments ------------------------------------------------------------------------------------


def _density(model: Callable[..., None], batch: TaskBatch) -> PyroTaskDensity:
    structure = model_structure(model, batch.support_x, batch.support_y)
    return PyroTaskDensity(model, structure, batch.support_x[:1])


def _family_moments(family: str, f: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of y given the linear predictor ``f``."""
    if family == "bernoulli":
        p = torch.sigmoid(f)
        return p, p * (1 - p)
    if family == "poisson":
        rate = torch.exp(0.5 * f)
        return rate, rate
    return f, torch.full_like(f, T_SCALE**2 * NU / (NU - 2))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_point_mass_predictive_has_the_family_moments(family: str) -> None:
    model = MODELS[family]
    batch = simulate(model)
    phi = TRUE_THETA + 0.3 * torch.randn(batch.num_tasks, 3)
    posterior = PointMassPosterior(_density(model, batch), {"theta": TRUE_THETA}, phi)
    prediction = posterior.predict(batch.query_x)
    assert isinstance(prediction, DrawsPrediction)
    mean, variance = _family_moments(family, _linear(batch.query_x, phi.unsqueeze(1)))
    assert_close(prediction.mean, mean)
    assert_close(prediction.variance, variance)
    # one component: the log density is the family's own
    fn = {
        "bernoulli": lambda f: dist.Bernoulli(logits=f),
        "poisson": lambda f: dist.Poisson(torch.exp(0.5 * f)),
        "studentt": lambda f: dist.StudentT(NU, f, T_SCALE),
    }[family](_linear(batch.query_x, phi.unsqueeze(1)))
    assert_close(prediction.log_prob(batch.query_y), fn.log_prob(batch.query_y))
    # draws reproduce the moments within Monte Carlo error
    draws = prediction.sample(20000, generator=torch.Generator().manual_seed(0))
    se = (variance / 20000).sqrt()
    assert float(((draws.mean(0) - mean).abs() / se).max()) < 5.0
    # a central interval holds at least its level of the mass (discrete: at least)
    lower, upper = prediction.interval(0.9)
    inside = ((draws >= lower) & (draws <= upper)).double().mean(0)
    assert float(inside.min()) > 0.86


@pytest.mark.parametrize("family", sorted(MODELS))
def test_laplace_predictive_moments_are_expectations_over_the_posterior(family: str) -> None:
    model = MODELS[family]
    batch = simulate(model)
    density = _density(model, batch)
    params = {"theta": TRUE_THETA}
    phi = TRUE_THETA.expand(batch.num_tasks, 3).clone()
    posterior = laplace_posterior(
        density, params, phi, batch.support_x, batch.support_y, curvature="ggn", refine_steps=3
    )
    S = 400
    prediction = posterior.predict(
        batch.query_x, num_samples=S, generator=torch.Generator().manual_seed(1)
    )
    assert isinstance(prediction, DrawsPrediction)
    # E[y] = E_phi[E[y | phi]] (Bernoulli: E[p]; Poisson: E[rate]; StudentT: E[loc]) and the
    # law of total variance, against many more posterior draws
    many = posterior.sample(20000, generator=torch.Generator().manual_seed(2))  # (S, T, D)
    cond_mean, cond_var = _family_moments(family, _linear(batch.query_x, many.unsqueeze(2)))
    expected_mean = cond_mean.mean(0)
    expected_var = cond_var.mean(0) + cond_mean.var(0)
    se = (cond_mean.var(0) / S).sqrt()
    assert float(((prediction.mean - expected_mean).abs() / se).max()) < 5.0
    assert_close(prediction.variance, expected_var, rtol=0.25, atol=0.0)
    # the mixture's log density is the log-mean-exp of the components'
    draws = posterior.sample(S, generator=torch.Generator().manual_seed(1))
    lp = evaluate_components(family, _linear(batch.query_x, draws.unsqueeze(2)), batch.query_y)
    assert_close(
        prediction.log_prob(batch.query_y),
        torch.logsumexp(lp, 0) - math.log(S),
        rtol=1e-8,
        atol=1e-8,
    )


def evaluate_components(family: str, f: Tensor, y: Tensor) -> Tensor:
    fn: Any = {
        "bernoulli": lambda: dist.Bernoulli(logits=f),
        "poisson": lambda: dist.Poisson(torch.exp(0.5 * f)),
        "studentt": lambda: dist.StudentT(NU, f, T_SCALE),
    }[family]()
    return fn.log_prob(y)


def test_evaluate_scores_a_bernoulli_model_with_accuracy_and_coverage() -> None:
    batch = simulate(logistic)
    density = _density(logistic, batch)
    posterior = PointMassPosterior(
        density, {"theta": TRUE_THETA}, TRUE_THETA.expand(batch.num_tasks, 3)
    )
    metrics = evaluate_posterior(posterior, batch)
    assert metrics.accuracy is not None and metrics.mse is not None
    assert bool(torch.isfinite(metrics.nll).all())
    assert set(metrics.coverage) == {0.5, 0.9}
