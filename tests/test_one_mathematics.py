"""The core is the one home of the mode search, the exact Hessian, the log joint and the
Laplace evidence (issue 19): each checked against an independent reference, and the breaks
found on the paths tests did not walk (a NaN Newton direction, a hyper-Laplace that stops short).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import hessian
from torch.testing import assert_close

from hierbayes.errors import UnconvergedWarning
from hierbayes.inference.core.evidence import exact_hessian, laplace_log_evidence
from hierbayes.inference.core.joint import batched_hessian, log_joint
from hierbayes.inference.core.mode import newton_mode
from hierbayes.inference.curvature import CurvatureEstimate, CurvatureInputs, ggn
from hierbayes.inference.posteriors.hyper_laplace import hyper_laplace
from hierbayes.models.density import task_density
from hierbayes.models.structure import model_structure
from hierbayes.tasks import TaskBatch
from tests.programs import family_program, family_tasks


def _studentt_prior_logistic(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """A prior that is not Normal (Student t) and a Bernoulli likelihood: the exact Hessian of
    the log joint must include the prior's own curvature, not a diagonal precision."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.StudentT(3.0, theta, 0.7).to_event(1))
        logits = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=None if y is None else y[..., 0])


def _density(model, batch: TaskBatch):  # type: ignore[no-untyped-def]
    structure = model_structure(model, batch.support_x, batch.support_y)
    return task_density(model, structure, batch.support_x)


def test_the_exact_hessian_is_each_tasks_autograd_hessian_of_its_log_joint() -> None:
    batch = family_tasks("bernoulli", T=4, N=9)
    density = _density(_studentt_prior_logistic, batch)
    params = {"theta": torch.tensor([0.3, -0.2])}
    phi = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    x, y = batch.support_x, batch.support_y

    def joint(p: torch.Tensor) -> torch.Tensor:
        return log_joint(density, params, p, x, y)

    _, _, batched = batched_hessian(joint, phi, create_graph=False)
    for j in range(4):  # the reference: one task at a time, torch.autograd.functional

        def one(p: torch.Tensor, j: int = j) -> torch.Tensor:
            full = phi.clone()
            full[j] = p
            return joint(full)[j]

        assert_close(batched[j], hessian(one, phi[j]), rtol=1e-10, atol=1e-10)
    inputs = CurvatureInputs(density, params, phi, x, y, None, torch.ones(4, 2), False)
    assert_close(exact_hessian(inputs).to_dense(), -batched)


def test_the_laplace_evidence_is_exact_for_linear_gaussian_tasks_at_any_start() -> None:
    """log N(y; X theta, s^2 X X^T + sigma^2 I) against the Laplace evidence after the Newton
    search with the exact Hessian (one step reaches the mode)."""
    batch = family_tasks("normal", T=3, N=7)
    density = _density(family_program("normal"), batch)
    theta = torch.tensor([0.4, -0.1])
    params = {"theta": theta}
    x, y = batch.support_x, batch.support_y
    got = laplace_log_evidence(
        density, params, torch.zeros(3, 2), x, y, curvature=exact_hessian, mode_steps=3
    )
    X = torch.cat([x, torch.ones_like(x)], dim=-1)  # (T, N, 2): slope and intercept
    cov = 1.0 * X @ X.transpose(1, 2) + 0.25 * torch.eye(7)
    expected = dist.MultivariateNormal(X @ theta, cov).log_prob(y[..., 0])
    assert_close(got, expected, rtol=1e-10, atol=1e-10)


class _NaNForTask0:
    """The GGN, except that solving with task 0's curvature returns NaN (an ill-conditioned
    solve), as a user's curvature can."""

    def __call__(self, inputs: CurvatureInputs) -> CurvatureEstimate:
        estimate = ggn(inputs)
        solve = estimate.solve

        def broken(rhs: torch.Tensor) -> torch.Tensor:
            out = solve(rhs).clone()
            out[0] = math.nan
            return out

        estimate.solve = broken  # type: ignore[method-assign]
        return estimate


def test_a_task_whose_newton_direction_is_nan_stays_where_it_was_and_is_reported() -> None:
    batch = family_tasks("bernoulli", T=4, N=9)
    density = _density(family_program("bernoulli"), batch)
    params = {"theta": torch.tensor([0.3, -0.2])}
    start = torch.zeros(4, 2)
    search = newton_mode(
        density,
        params,
        start,
        batch.support_x,
        batch.support_y,
        precision=torch.ones(4, 2),
        curvature=_NaNForTask0(),
        steps=20,
        create_graph=False,
    )
    assert torch.equal(search.phi[0], start[0])
    assert bool(torch.isfinite(search.phi).all())
    report = search.report()
    assert report.failed_tasks == [0]
    assert not bool(report.converged[0]) and bool(report.converged[1:].all())


def _grouped(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(mu, tau).expand([1]).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(phi[..., 0], 1.0), obs=None if y is None else y[..., 0])


def test_hyper_laplace_that_stops_short_warns_and_records_it() -> None:
    g = torch.Generator().manual_seed(0)
    effects = 1.0 + 0.8 * torch.randn(8, 1, generator=g)
    y = (effects + torch.randn(8, 6, generator=g)).unsqueeze(-1)
    tasks = TaskBatch(torch.zeros(8, 6, 1), y)
    far = {"mu": torch.tensor(-4.0), "tau": torch.tensor(0.2)}
    with pytest.warns(UnconvergedWarning, match="max_steps"):
        short = hyper_laplace(_grouped, tasks, params=far, max_steps=1)
    assert not short.converged and "max_steps" in short.stop_reason
    full = hyper_laplace(_grouped, tasks, params=far)
    assert full.converged and full.gradient_norm < 1e-4
