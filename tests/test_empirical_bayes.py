"""Empirical Bayes on groups as tasks: the optimum against a direct scipy maximisation of the
closed-form marginal likelihood, posteriors at the mode, convergence reports, the boundary."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize

from hierbayes.errors import TaskDataError
from hierbayes.inference import FitResult, fit
from hierbayes.inference.training.empirical_bayes import UnconvergedWarning
from hierbayes.models import ContextualEffects, EightSchools
from hierbayes.tasks import eight_schools_tasks, radon_tasks

F64 = torch.float64
# float64 reaches a gradient norm of a few 1e-8 on radon before rounding stalls the line search
TIGHT = dict(grad_tolerance=1e-7, loss_tolerance=0.0, meta_steps=200, progress=False)


def _radon_arrays() -> tuple[list[np.ndarray], list[np.ndarray]]:
    tasks = radon_tasks(dtype=F64)
    batch = tasks.batch()
    sizes = tasks.group_sizes.tolist()
    xs = [batch.support_x[j, : sizes[j]].numpy() for j in range(tasks.num_tasks)]
    ys = [batch.support_y[j, : sizes[j]].numpy() for j in range(tasks.num_tasks)]
    return xs, ys


def _half_normal(v: float, s: float) -> float:
    return 0.5 * math.log(2 / math.pi) - math.log(s) - 0.5 * (v / s) ** 2


def _radon_map2(u: np.ndarray, xs: list, ys: list, unconstrained: bool) -> float:
    r"""-(1/J)[sum_j log N(y_j; mu + X_j w, sigma^2 I + tau^2 11^T) + log p(mu, w, tau, sigma)]
    with u = (mu, log tau, w1, w2, w3, log sigma) (Sherman-Morrison for the covariance)."""
    mu, log_tau, w, log_sigma = u[0], u[1], u[2:5], u[5]
    tau2, s2 = math.exp(2 * log_tau), math.exp(2 * log_sigma)
    total = 0.0
    for x, y in zip(xs, ys, strict=True):
        n = len(y)
        r = y - mu - x @ w
        logdet = n * math.log(s2) + math.log1p(n * tau2 / s2)
        quad = (r @ r - tau2 / (s2 + n * tau2) * r.sum() ** 2) / s2
        total += -0.5 * (n * math.log(2 * math.pi) + logdet + quad)
    prior = -0.5 * (mu**2 + w @ w) - 4 * 0.5 * math.log(2 * math.pi)  # mu, w: N(0, 1)
    prior += _half_normal(math.exp(log_tau), 1.0) + _half_normal(math.exp(log_sigma), 1.0)
    if unconstrained:
        prior += log_tau + log_sigma
    return -(total + prior) / len(ys)


@pytest.fixture(scope="module")
def radon_fit() -> FitResult:
    return fit(
        ContextualEffects(),
        radon_tasks(dtype=F64),
        method="llama",
        objective="evidence",
        dtype=F64,
        **TIGHT,
    )


def test_radon_optimum_matches_scipy_on_the_closed_form_marginal(radon_fit: FitResult) -> None:
    xs, ys = _radon_arrays()
    start = np.array([1.0, math.log(0.2), 0.5, -0.5, 0.5, math.log(0.8)])
    ref = optimize.minimize(
        _radon_map2, start, args=(xs, ys, False), method="BFGS", options={"gtol": 1e-11}
    )
    params = radon_fit.params
    assert radon_fit.convergence is not None and radon_fit.convergence.converged
    assert radon_fit.convergence.optimizer == "lbfgs"
    np.testing.assert_allclose(float(params["tau"]), math.exp(ref.x[1]), atol=1e-6)
    np.testing.assert_allclose(float(params["mu"]), ref.x[0], atol=1e-6)
    np.testing.assert_allclose(params["w"].numpy(), ref.x[2:5], atol=1e-6)
    np.testing.assert_allclose(float(params["sigma"]), math.exp(ref.x[5]), atol=1e-6)
    np.testing.assert_allclose(radon_fit.history[-1], ref.fun, rtol=1e-10)
    assert abs(float(params["tau"]) - 0.127) < 1e-3  # not 0.261: no house counted twice


def test_adapt_after_evidence_fit_is_centred_at_the_exact_conditional_mode(
    radon_fit: FitResult,
) -> None:
    tasks = radon_tasks(dtype=F64)
    batch = tasks.batch()
    j = int(tasks.group_sizes.argmax())
    assert int(tasks.group_sizes[j]) == 116
    p = radon_fit.params
    n = 116
    x, y = batch.support_x[j, :n], batch.support_y[j, :n]
    tau2, s2 = float(p["tau"]) ** 2, float(p["sigma"]) ** 2
    precision = n / s2 + 1 / tau2
    exact = (float((y - x @ p["w"]).sum()) / s2 + float(p["mu"]) / tau2) / precision
    posterior = radon_fit.adapt(batch)
    torch.testing.assert_close(
        posterior.mean[j].reshape(()), torch.tensor(exact), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        posterior.covariance()[j].reshape(()), torch.tensor(1 / precision), atol=1e-9, rtol=1e-6
    )


def test_counties_with_one_house_shrink_more_than_large_ones(radon_fit: FitResult) -> None:
    tasks = radon_tasks(dtype=F64)
    batch = tasks.batch()
    p = radon_fit.params
    mean = radon_fit.adapt(batch).mean.reshape(-1)
    sizes = tasks.group_sizes
    # the raw intercept of each county (its mean residual) against the shrunken one
    residual = (batch.support_y - batch.support_x @ p["w"]) * (
        torch.arange(batch.support_y.shape[1])[None, :] < sizes[:, None]
    )
    raw = residual.sum(1) / sizes
    shrink = ((mean - p["mu"]) / (raw - p["mu"])).abs()
    assert float(shrink[sizes == 1].max()) < float(shrink[sizes >= 50].min())


def test_query_less_tasks_refuse_maml_naming_the_fix() -> None:
    with pytest.raises(TaskDataError, match="objective='evidence'"):
        fit(EightSchools(), eight_schools_tasks(), method="maml", meta_steps=1, progress=False)
    with pytest.raises(
        TaskDataError, match=r"needs a query set for method=.llama., objective=.predictive."
    ):
        fit(
            EightSchools(),
            eight_schools_tasks(),
            method="llama",
            objective="predictive",
            meta_steps=1,
            progress=False,
        )


def test_eight_schools_warns_at_the_boundary_and_unconstrained_moves_off_it() -> None:
    with pytest.warns(UserWarning, match="peaks at the boundary") as record:
        result = fit(
            EightSchools(),
            eight_schools_tasks(),
            method="llama",
            objective="evidence",
            meta_batch_size=8,
            progress=False,
        )
    message = next(str(w.message) for w in record if "boundary" in str(w.message))
    assert "hyperprior_space='unconstrained'" in message and "NUTS" in message
    assert float(result.params["tau"]) < 0.05
    assert all(math.isfinite(v) for v in result.history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        off = fit(
            EightSchools(),
            eight_schools_tasks(),
            method="llama",
            objective="evidence",
            meta_batch_size=8,
            hyperprior_space="unconstrained",
            progress=False,
        )
    # the mode of p(mu, log tau | y): closed form marginal y_j ~ N(mu, sigma_j^2 + tau^2)
    y = np.array([28, 8, -3, 7, -1, 1, 18, 12.0])
    s = np.array([15, 10, 16, 11, 9, 11, 10, 18.0])

    def negative(u: np.ndarray) -> float:
        mu, log_tau = u
        tau = math.exp(log_tau)
        v = s**2 + tau**2
        lik = -0.5 * np.sum(np.log(2 * np.pi * v) + (y - mu) ** 2 / v)
        prior = -0.5 * (mu / 5) ** 2 + math.log(2 / (math.pi * 5 * (1 + (tau / 5) ** 2)))
        return -(lik + prior + log_tau) / 8

    ref = optimize.minimize(negative, np.array([4.0, 1.0]), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(float(off.params["tau"]), math.exp(ref.x[1]), rtol=1e-4)
    np.testing.assert_allclose(float(off.params["mu"]), ref.x[0], rtol=1e-4)


def test_eight_schools_float32_stays_finite() -> None:
    with pytest.warns(UserWarning, match="boundary"):
        result = fit(
            EightSchools(),
            eight_schools_tasks(dtype=torch.float32),
            method="llama",
            objective="evidence",
            meta_batch_size=8,
            dtype=torch.float32,
            progress=False,
        )
    assert result.convergence is not None
    assert all(math.isfinite(float(v)) for v in result.params.values())


def test_adam_run_that_stops_early_warns_unconverged() -> None:
    with pytest.warns(UnconvergedWarning, match="full_batch=True"):
        result = fit(
            EightSchools(),
            eight_schools_tasks(),
            method="llama",
            objective="evidence",
            meta_batch_size=8,
            full_batch=False,
            meta_steps=60,
            lr=1e-3,
            progress=False,
        )
    assert result.convergence is not None and not result.convergence.converged
    assert result.convergence.optimizer == "adam"


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="hyperprior_space"):
        fit(
            EightSchools(),
            eight_schools_tasks(),
            method="llama",
            objective="evidence",
            hyperprior_space="log",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="grad_tolerance"):
        fit(
            EightSchools(),
            eight_schools_tasks(),
            method="llama",
            objective="evidence",
            grad_tolerance=-1.0,
        )
