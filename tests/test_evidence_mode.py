"""The Laplace evidence at the mode (issue 9, item 3): damped Newton refinement, its use in the
evidence objective and in ``adapt``, checked against importance-sampled evidences of a
hierarchical logistic regression written as a plain Pyro program."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference import TruncatedGradientGuide, fit
from hierbayes.inference.core.evidence import laplace_log_evidence
from hierbayes.inference.core.joint import log_joint
from hierbayes.inference.core.laplace import prior_precision, select_data
from hierbayes.inference.core.mode import ModeSearch, newton_mode
from hierbayes.inference.core.mode_report import ModeReport
from hierbayes.inference.objectives import LaplaceEvidenceObjective
from hierbayes.models import TaskDensity
from hierbayes.tasks import TaskBatch
from tests.test_laplace import closed_form_log_evidence, linear_setup

TRUE_MEAN = torch.tensor([1.5, -1.0, 0.5])


def logistic(x: Tensor, y: Tensor | None = None) -> None:
    """theta ~ N(0, 5²); phi_j ~ N(theta, 1); y_jn ~ Bernoulli(logits = x_jn·w_j + b_j)."""
    d = x.shape[-1]
    theta = pyro.sample("theta", dist.Normal(torch.zeros(d + 1), 5.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        logits = (x * phi[..., :d]).sum(-1) + phi[..., d]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def simulate(T: int, seed: int, N: int = 10, M: int = 30) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    w = TRUE_MEAN + torch.randn(T, 3, generator=g)
    x = torch.randn(T, N + M, 2, generator=g)
    p = torch.sigmoid((x * w[:, None, :2]).sum(-1) + w[:, None, 2])
    y = (torch.rand(T, N + M, generator=g) < p).to(x.dtype)
    return TaskBatch(x[:, :N], y[:, :N], x[:, N:], y[:, N:])


def all_data(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor | None]:
    query = batch.require_query("the test")
    return select_data((batch.support_x, batch.support_y, None), query, "both")


def importance_sampled_nlml(
    density: TaskDensity, theta: Tensor, batch: TaskBatch, draws: int = 4000
) -> tuple[Tensor, Tensor]:
    r""":math:`-\log p(\mathcal D_j\mid\theta)` per task by importance sampling, and its standard
    error (delta method). The proposal is a Student-t (4 d.o.f.) with the Laplace Gaussian's
    centre and scale: heavier tails than the posterior, so the weights have finite variance."""
    params = {"theta": theta}
    x, y, _ = all_data(batch)
    T, D = x.shape[0], theta.shape[-1]
    mode = newton_mode(
        density,
        params,
        theta.expand(T, D),
        x,
        y,
        precision=prior_precision(density, params, T),
        steps=30,
        tolerance=1e-12,
        create_graph=False,
    )
    assert bool(mode.converged.all())
    scale = torch.linalg.cholesky(mode.curvature.covariance())
    proposal = dist.MultivariateStudentT(torch.tensor(4.0), mode.phi, scale)
    pyro.set_rng_seed(1)
    phi = proposal.sample((draws,))  # (S, T, D)
    flat = phi.reshape(draws * T, D)
    xs, ys = x.repeat(draws, 1, 1), y.repeat(draws, 1)
    log_w = log_joint(density, params, flat, xs, ys).reshape(draws, T) - proposal.log_prob(phi)
    estimate = torch.logsumexp(log_w, 0) - math.log(draws)
    w = torch.exp(log_w - log_w.max(0).values)
    standard_error = w.std(0) / w.mean(0) / math.sqrt(draws)
    return -estimate, standard_error


def evidence_losses_at(
    guide: TruncatedGradientGuide, theta: Tensor, batch: TaskBatch, mode_steps: int = 5
) -> tuple[Tensor, ModeReport | None]:
    """The evidence objective's per-task losses at ``theta``, from the guide's inner loop, and
    the mode search's report."""
    objective = LaplaceEvidenceObjective(mode_steps=mode_steps)
    objective.check(guide.density)
    params = {"theta": theta}
    with torch.no_grad():
        phi = guide.adapt(params, batch.support_x, batch.support_y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mode_steps=0 is not a mode search
        losses = objective.task_losses(guide.density, params, phi, batch)
    return losses.values.detach(), losses.mode


# -- the Newton refinement ----------------------------------------------------------------------


def test_one_newton_step_reaches_the_exact_mode_of_the_linear_gaussian_model() -> None:
    sigma, s = 0.5, 0.8
    batch, _model, density, params, X = linear_setup(sigma=sigma, s=s)
    phi = torch.randn(4, 4)
    P = prior_precision(density, params, 4)
    search = newton_mode(
        density, params, phi, batch.support_x, batch.support_y, precision=P, steps=5
    )
    assert search.steps == 1 and bool(search.converged.all())
    H = X.transpose(1, 2) @ X / sigma**2 + torch.eye(4) / s**2
    rhs = (X.transpose(1, 2) @ batch.support_y).squeeze(-1) / sigma**2 + params["theta"] / s**2
    assert_close(search.phi, torch.linalg.solve(H, rhs), atol=1e-10, rtol=1e-10)
    expected = closed_form_log_evidence(X, batch.support_y, params["theta"], sigma, s)
    for correction in (True, False):
        assert_close(
            search.log_evidence(newton_correction=correction), expected, atol=1e-10, rtol=1e-10
        )
    # the search's own evidence is laplace_log_evidence at its last iterate
    assert_close(
        search.log_evidence(),
        laplace_log_evidence(density, params, search.phi, batch.support_x, batch.support_y),
        atol=1e-12,
        rtol=1e-12,
    )


def test_damped_newton_is_monotone_where_plain_newton_is_not() -> None:
    batch = simulate(T=6, seed=3)
    guide = TruncatedGradientGuide(logistic, batch)
    density, params = guide.density, {"theta": TRUE_MEAN}
    x, y, _ = all_data(batch)
    P = prior_precision(density, params, 6)
    start = TRUE_MEAN + torch.tensor([6.0, -6.0, 6.0])  # saturated logits: the GGN is tiny
    start = start.expand(6, 3)
    # a plain Newton step from here overshoots: the log joint falls for some task
    plain = newton_mode(density, params, start, x, y, precision=P, steps=0, create_graph=False)
    jump = start + plain.curvature.solve(plain.gradient)
    assert bool((log_joint(density, params, jump, x, y) < plain.log_joint).any())
    damped = newton_mode(density, params, start, x, y, precision=P, steps=30, tolerance=1e-10)
    assert bool((damped.history.diff(dim=0) >= 0).all())  # never lowers the log joint
    assert bool(damped.converged.all()) and not bool(damped.rejected.any())
    assert float(damped.gradient_norm.max()) < 1e-4


def test_the_refined_evidence_is_differentiable_through_the_mode() -> None:
    batch = simulate(T=4, seed=5)
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=2, step_size=0.1)
    objective = LaplaceEvidenceObjective(mode_steps=5, mode_tolerance=0.0)
    objective.check(guide.density)

    def loss(theta: Tensor) -> Tensor:
        params = {"theta": theta}
        phi = guide.adapt(params, batch.support_x, batch.support_y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tolerance 0 is never met
            return objective.task_losses(guide.density, params, phi, batch).values.sum()

    theta = torch.tensor([0.7, -0.4, 0.2], requires_grad=True)
    (grad,) = torch.autograd.grad(loss(theta), theta)
    eps = 1e-6
    for i in range(3):
        step = torch.zeros(3)
        step[i] = eps
        with torch.no_grad():
            numeric = (loss(theta + step) - loss(theta - step)) / (2 * eps)
        assert abs(float(grad[i]) - float(numeric)) <= 1e-6 * (1 + abs(float(numeric)))


# -- the evidence objective against the truth ---------------------------------------------------


def test_evidence_objective_matches_the_importance_sampled_evidence() -> None:
    batch = simulate(T=12, seed=0)
    theta = torch.tensor([1.0, -0.5, 0.0])
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=3, step_size=0.1)
    truth, standard_error = importance_sampled_nlml(guide.density, theta, batch)
    assert float(standard_error.max()) < 0.02
    losses, report = evidence_losses_at(guide, theta, batch)
    assert report is not None and bool(report.converged.all())
    assert 0 < report.steps <= 5
    assert float(report.gradient_norm.max()) < 1.0  # decrement below 1e-2 nats
    # Laplace at the mode: within MC error plus Laplace's own error (~0.04 nats at N = 40, D = 3)
    assert float((losses - truth).abs().max()) < 0.1
    # at the truncated-gradient point with the one-step correction (the old objective) some
    # task is off by nats: the comparison has power
    old, _ = evidence_losses_at(guide, theta, batch, mode_steps=0)
    assert float((old - truth).abs().max()) > 1.0


def test_meta_training_no_longer_drives_the_evidence_below_the_truth() -> None:
    batch = simulate(T=16, seed=2)
    options = dict(
        method="llama",
        objective="evidence",
        meta_steps=40,
        meta_batch_size=16,
        inner_steps=3,
        step_size=0.1,
        lr=0.05,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # early steps may end short of the mode
        result = fit(logistic, batch, **options)  # type: ignore[arg-type]
        exploited = fit(logistic, batch, mode_steps=0, **options)  # type: ignore[arg-type]
    theta = result.params["theta"]
    truth, standard_error = importance_sampled_nlml(result.guide.density, theta, batch)
    losses, _ = evidence_losses_at(result.guide, theta, batch)
    tolerance = 4 * standard_error
    assert bool((losses >= truth - tolerance).all()), (losses - truth).tolist()
    assert float((losses - truth).mean()) < 0.1
    # the old objective (evaluated at the truncated-gradient point) is driven below the truth
    theta_old = exploited.params["theta"]
    truth_old, _ = importance_sampled_nlml(exploited.guide.density, theta_old, batch)
    old, _ = evidence_losses_at(exploited.guide, theta_old, batch, mode_steps=0)
    assert float((truth_old - old).mean()) > 0.5
    # and the mode-evaluated objective found the better theta
    assert float(truth.mean()) < float(truth_old.mean())


# -- adapt ---------------------------------------------------------------------------------------


def test_adapt_refines_to_the_mode_and_warns_when_handed_a_point_far_from_it() -> None:
    batch = simulate(T=8, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = fit(
            logistic,
            batch,
            method="llama",
            objective="evidence",
            meta_steps=10,
            inner_steps=2,
            step_size=0.05,
            lr=0.05,
            progress=False,
        )
    density, params = result.guide.density, result.params
    P = prior_precision(density, params, 8)

    def measured(phi: Tensor) -> ModeSearch:
        return newton_mode(
            density,
            params,
            phi,
            batch.support_x,
            batch.support_y,
            precision=P,
            steps=0,
            create_graph=False,
        )

    with pytest.warns(UserWarning, match=r"away from the mode.*pass refine=5"):
        truncated = result.adapt(batch, refine=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refined = result.adapt(batch, refine=5)
        default = result.adapt(batch)  # up to 20 steps, to the tolerance
    at_refined, at_truncated = measured(refined.mean), measured(truncated.mean)
    assert bool((at_refined.gradient_norm < 0.2 * at_truncated.gradient_norm).all())
    assert float(at_refined.decrement.max()) <= 1e-2  # the objective's mode_tolerance
    assert float(at_truncated.distance.max()) > 0.5  # what the warning measured
    assert_close(default.mean, refined.mean)
    # the refinement never lowered any task's log joint
    before = log_joint(density, params, truncated.mean, batch.support_x, batch.support_y)
    after = log_joint(density, params, refined.mean, batch.support_x, batch.support_y)
    assert bool((after >= before).all())
    with pytest.raises(ValueError, match="refine must be"):
        result.adapt(batch, refine=-1)


def test_adapt_refine_gives_maml_the_map_and_does_not_warn() -> None:
    batch = simulate(T=4, seed=6)
    result = fit(
        logistic, batch, method="maml", meta_steps=3, inner_steps=1, step_size=0.05, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        point = result.adapt(batch)
        mapped = result.adapt(batch, refine=10)
    density, params = result.guide.density, result.params
    P = prior_precision(density, params, 4)
    search = newton_mode(
        density,
        params,
        mapped.mean,
        batch.support_x,
        batch.support_y,
        precision=P,
        steps=0,
        create_graph=False,
    )
    assert float(search.decrement.max()) <= 1e-4
    before = log_joint(density, params, point.mean, batch.support_x, batch.support_y)
    assert bool((search.log_joint > before).all())


def test_evidence_objective_reports_an_unfinished_mode_search() -> None:
    batch = simulate(T=4, seed=7)
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=0)
    objective = LaplaceEvidenceObjective(mode_steps=1, mode_tolerance=1e-12)
    objective.check(guide.density)
    params = {"theta": torch.tensor([6.0, -6.0, 6.0])}
    phi = guide.adapt(params, batch.support_x, batch.support_y)
    with pytest.warns(UserWarning, match="raise mode_steps"):
        report = objective.task_losses(guide.density, params, phi, batch).mode
    assert report is not None and report.steps == 1
    assert not bool(report.converged.all())
    with pytest.raises(ValueError, match="mode_steps"):
        LaplaceEvidenceObjective(mode_steps=-1)


def test_a_task_that_stops_short_of_its_mode_gets_no_newton_correction() -> None:
    """repro_12: far from the mode the quadratic model's 1/2 g^T H^-1 g can exceed the true
    gain in log joint, and meta-training exploited it (the "-log evidence" of discrete labels
    went negative). After a search the correction is added only where a task converged."""
    batch = simulate(T=6, seed=7)
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=0)
    params = {"theta": torch.tensor([6.0, -6.0, 6.0])}
    x, y, _ = all_data(batch)
    T = x.shape[0]
    start = params["theta"].expand(T, 3)
    P = prior_precision(guide.density, params, T)
    search = newton_mode(
        guide.density, params, start, x, y, precision=P, steps=3, tolerance=1e-3,
        create_graph=False,
    )  # fmt: skip
    converged = search.converged
    assert bool(converged.any()) and not bool(converged.all())  # a mixed batch
    plain = search.log_evidence(newton_correction=False)
    corrected = search.log_evidence(newton_correction=True)
    assert_close(corrected[~converged], plain[~converged])
    assert_close(corrected[converged], plain[converged] + search.decrement[converged])
    # the uncorrected evidence at the last iterate lies below the one at the mode
    mode = newton_mode(
        guide.density, params, start, x, y, precision=P, steps=40, tolerance=1e-12,
        create_graph=False,
    )  # fmt: skip
    assert bool(mode.converged.all())
    at_mode = mode.log_evidence(newton_correction=False)
    assert bool((plain[~converged] <= at_mode[~converged]).all())
    # with no search (steps=0) the one-Newton-step correction applies everywhere, as before;
    # from this far away it overshoots the evidence at the mode by tens of nats
    first = newton_mode(
        guide.density, params, start, x, y, precision=P, steps=0, create_graph=False
    )
    one_step = first.log_evidence()
    assert_close(one_step, first.log_evidence(newton_correction=False) + first.decrement)
    assert float((one_step - at_mode).max()) > 10.0
