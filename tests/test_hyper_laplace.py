"""Hyperparameter uncertainty at Laplace cost, against brute-force quadrature over (log tau, mu).

The data set is small and grouped, with groups of unequal sizes (1 to 8 points, padded and
masked): y_jn ~ N(alpha_j, s), alpha_j ~ N(mu, tau), mu ~ N(0, 1), tau ~ HalfNormal(1), s known.
Given (mu, tau) everything is Gaussian, so p(log tau, mu | D) is known in closed form up to a
constant and a fine grid over it gives the marginal posteriors of the alpha_j to quadrature
accuracy: the reference every figure here is checked against.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference.posteriors.hyper_laplace import hyper_laplace, task_modes
from hierbayes.inference.posteriors.unconstrained import GlobalCoordinates
from hierbayes.models import PyroTaskDensity, model_structure
from hierbayes.tasks import TaskBatch

NOISE = 1.0
SIZES = (1, 2, 3, 5, 8)


def grouped_model(x: Tensor, y: Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(alpha + 0.0 * x[..., 0], NOISE), obs=y)


def grouped_tasks(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    T, N = len(SIZES), max(SIZES)
    alpha = 0.5 + 0.6 * torch.randn(T, 1, generator=g)
    y = alpha + NOISE * torch.randn(T, N, generator=g)
    mask = torch.arange(N).expand(T, N) < torch.tensor(SIZES).unsqueeze(1)
    return TaskBatch(torch.zeros(T, N, 1), torch.where(mask, y, 0.0), support_mask=mask)


def grid_posterior(tasks: TaskBatch, n: int = 801) -> dict[str, Tensor]:
    """The exact marginal posteriors by quadrature over (u = log tau, mu)."""
    mask = tasks.support_mask
    assert mask is not None
    counts = mask.sum(1).double()
    ybar = (tasks.support_y * mask).sum(1) / counts
    u = torch.linspace(-6.0, 2.5, n, dtype=torch.float64)
    mu = torch.linspace(-3.0, 4.0, n, dtype=torch.float64)
    U, M = torch.meshgrid(u, mu, indexing="ij")
    tau = U.exp()
    # p(y_j | mu, tau) depends on the data through ybar_j up to a constant in (mu, tau)
    var = tau.unsqueeze(-1).square() + NOISE**2 / counts
    log_lik = dist.Normal(M.unsqueeze(-1), var.sqrt()).log_prob(ybar).sum(-1)
    log_post = (
        log_lik
        + dist.Normal(0.0, 1.0).log_prob(M)
        + dist.HalfNormal(1.0).log_prob(tau)
        + U  # log-Jacobian of tau = exp(u)
    )
    w = torch.softmax(log_post.flatten(), 0).reshape(log_post.shape)
    # alpha_j | mu, tau, D: precision 1/tau^2 + n_j/s^2
    precision = 1 / tau.unsqueeze(-1).square() + counts / NOISE**2
    mean = (M.unsqueeze(-1) / tau.unsqueeze(-1).square() + counts * ybar / NOISE**2) / precision
    m = (w.unsqueeze(-1) * mean).sum((0, 1))
    second = (w.unsqueeze(-1) * (1 / precision + mean.square())).sum((0, 1))
    return {
        "mean": m,
        "sd": (second - m.square()).sqrt(),
        "log_post": log_post,
        "u": u,
        "mu": mu,
    }


def test_the_gaussian_over_the_globals_is_the_exact_curvature_at_the_mode() -> None:
    tasks = grouped_tasks()
    found = hyper_laplace(grouped_model, tasks)
    assert found.labels == ["mu", "tau"]
    assert found.gradient_norm < 1e-6
    # the exact log posterior of (mu, u) in closed form: its mode and Hessian by finite differences
    mask = tasks.support_mask
    assert mask is not None
    counts = mask.sum(1).double()
    ybar = (tasks.support_y * mask).sum(1) / counts

    def log_post(v: Tensor) -> Tensor:
        mu, u = v[0], v[1]
        var = torch.exp(2 * u) + NOISE**2 / counts
        return (
            dist.Normal(mu, var.sqrt()).log_prob(ybar).sum()
            + dist.Normal(0.0, 1.0).log_prob(mu)
            + dist.HalfNormal(1.0).log_prob(u.exp())
            + u
        )

    v = found.mean.clone()
    hessian = torch.autograd.functional.hessian(log_post, v)
    grad = torch.autograd.functional.jacobian(log_post, v)
    assert float(grad.norm()) < 1e-6  # the same mode
    assert_close(found.covariance, torch.linalg.inv(-hessian), rtol=1e-8, atol=1e-10)
    # and the log marginal differs from the exact one by the constant that drops out of both
    assert math.isfinite(found.log_marginal)


def test_task_posteriors_integrated_over_the_globals_match_quadrature() -> None:
    tasks = grouped_tasks()
    exact = grid_posterior(tasks)
    cubature = hyper_laplace(grouped_model, tasks)
    eb = cubature.empirical_bayes
    # measured: cubature means within 0.031 of quadrature, sds within 3.5%; empirical Bayes'
    # sds 10-17% too small. A Gaussian over 2 skewed globals from 5 groups, so not exact.
    sd_error = (cubature.task_posteriors.sd[:, 0] / exact["sd"] - 1).abs()
    eb_error = (eb.sd[:, 0] / exact["sd"] - 1).abs()
    assert float(sd_error.max()) < 0.06, sd_error
    assert_close(cubature.task_posteriors.mean[:, 0], exact["mean"], rtol=0, atol=0.045)
    assert bool((eb.sd[:, 0] < exact["sd"]).all())
    assert float(eb_error.min()) > 0.08
    assert float(eb_error.mean()) > 3 * float(sd_error.mean())


@pytest.mark.slow
def test_importance_weighted_draws_match_quadrature_within_monte_carlo_error() -> None:
    tasks = grouped_tasks()
    exact = grid_posterior(tasks)
    weighted = hyper_laplace(
        grouped_model, tasks, quadrature="draws", num_nodes=600, importance=True, seed=1
    ).task_posteriors
    # Monte Carlo standard error of each mean from the weighted node means (ESS ~250 here)
    w = weighted.weights
    spread = weighted.component_means[..., 0] - weighted.mean[:, 0]
    se = (w.square().unsqueeze(-1) * spread.square()).sum(0).sqrt()
    assert float(((weighted.mean[:, 0] - exact["mean"]).abs() / se).max()) < 4.0
    assert_close(weighted.sd[:, 0], exact["sd"], rtol=0.06, atol=0)


def test_small_groups_shrink_more_than_large_ones() -> None:
    tasks = grouped_tasks()
    found = hyper_laplace(grouped_model, tasks).task_posteriors
    mask = tasks.support_mask
    assert mask is not None
    ybar = (tasks.support_y * mask).sum(1) / mask.sum(1)
    mu = found.params["mu"]
    shrinkage = 1 - (found.mean[:, 0] - mu) / (ybar - mu)
    # the group with one point is pulled further towards mu than the one with eight
    assert float(shrinkage[0]) > float(shrinkage[-1])


def test_task_modes_are_exact_for_linear_gaussian_groups_in_one_step() -> None:
    tasks = grouped_tasks()
    structure = model_structure(grouped_model, tasks.support_x, tasks.support_y)
    density = PyroTaskDensity(grouped_model, structure, tasks.support_x[:1])
    params = {"mu": torch.tensor(0.3), "tau": torch.tensor(0.7)}
    modes = task_modes(density, params, tasks.support_x, tasks.support_y, tasks.support_mask)
    mask = tasks.support_mask
    assert mask is not None
    counts = mask.sum(1).double()
    ybar = (tasks.support_y * mask).sum(1) / counts
    precision = 1 / 0.49 + counts / NOISE**2
    assert_close(modes.phi[:, 0], (0.3 / 0.49 + counts * ybar) / precision)
    assert_close(modes.hessian[:, 0, 0], precision)
    assert modes.steps == 1


def test_samples_and_global_draws_have_the_documented_shapes() -> None:
    tasks = grouped_tasks()
    found = hyper_laplace(grouped_model, tasks)
    draws = found.sample(7, generator=torch.Generator().manual_seed(0))
    assert draws["mu"].shape == (7,) and bool((draws["tau"] > 0).all())
    posterior = found.task_posteriors
    globals_, phi = posterior.joint_draws(2, 5, seed=0)
    assert phi.shape == (2, 5, len(SIZES), 1)
    assert globals_["tau"].shape == (2, 5)
    assert posterior.covariance().shape == (len(SIZES), 1, 1)
    coords = GlobalCoordinates(posterior.density, found.params)
    assert_close(coords.pack(found.params), found.mean)
