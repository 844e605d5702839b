"""Empirical Bayes recovers the truth: θ̂ → θ* as the number of linear tasks J grows.

Tasks are simulated from the hierarchical model with a known θ*:

    φ_j ~ N(θ*, s² I),   y_jn ~ N(x_jnᵀ φ_j, σ²)   (support N points, query M points).

Given the inputs, both estimators are linear in Gaussian draws, so each is exactly Gaussian,
θ̂ ~ N(θ*, C_J), with C_J known in closed form (the GLS covariance for exact empirical Bayes,
the sandwich covariance for MAML). Hence (θ̂ - θ*)ᵀ C_J⁻¹ (θ̂ - θ*) ~ χ²_D, which gives every
tolerance below: a χ² quantile with failure probability 1e-6.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyro
import torch
from scipy.stats import chi2
from torch import Tensor
from torch.testing import assert_close

from hierbayes.experiments.linear import LinearConfig, run_linear
from hierbayes.inference import fit
from hierbayes.inference.linear_gaussian import (
    ThetaEstimate,
    design_matrix,
    empirical_bayes_theta,
    largest_admissible_step_size,
    log_evidence,
    maml_theta,
)
from hierbayes.models import BayesianLinearRegression
from hierbayes.tasks import TaskCollection

THETA_STAR = torch.tensor(
    [1.5, -1.0, 0.5], dtype=torch.float64
)  # (w1, w2, b): d = 2 inputs and a bias
D = 3
SIGMA, PRIOR_SCALE = 0.5, 1.0
SHOTS, QUERY = 5, 10
STEP, STEPS = 0.01, 3  # MAML's inner loop: α on the summed log likelihood, k steps
FAILURE = 1e-6


def simulate(J: int, g: torch.Generator, replicates: tuple[int, ...] = ()) -> tuple[Tensor, ...]:
    """``(xs, ys, xq, yq)`` of J tasks, shapes ``(*replicates, J, N, 2)`` and ``(..., N, 1)``."""
    theta = THETA_STAR.to(torch.get_default_dtype())
    phi = theta + PRIOR_SCALE * torch.randn(*replicates, J, D, generator=g)
    xs = torch.randn(*replicates, J, SHOTS, 2, generator=g)
    xq = torch.randn(*replicates, J, QUERY, 2, generator=g)
    ys = design_matrix(xs, bias=True) @ phi[..., None]
    yq = design_matrix(xq, bias=True) @ phi[..., None]
    ys = ys + SIGMA * torch.randn(ys.shape, generator=g)
    yq = yq + SIGMA * torch.randn(yq.shape, generator=g)
    return xs, ys, xq, yq


def estimators(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> dict[str, ThetaEstimate]:
    """Exact empirical Bayes (on all N + M points of each task) and MAML (adapt on the support
    set, score on the query set)."""
    Xs, Xq = design_matrix(xs, bias=True), design_matrix(xq, bias=True)
    prior = PRIOR_SCALE**2 * torch.eye(D)
    return {
        "empirical_bayes": empirical_bayes_theta(
            torch.cat([Xs, Xq], -2),
            torch.cat([ys, yq], -2),
            noise_scale=SIGMA,
            prior_covariance=prior,
        ),
        "maml": maml_theta(
            Xs,
            ys,
            Xq,
            yq,
            noise_scale=SIGMA,
            step_size=STEP,
            steps=STEPS,
            generative_prior_covariance=prior,
        ),
    }


def test_theta_hat_converges_to_the_truth_as_tasks_grow() -> None:
    """Nested collections of J = 16 ... 1024 tasks: each θ̂ lies within the χ²_D ellipsoid of its
    own covariance, whose radius shrinks like 1/√J."""
    g = torch.Generator().manual_seed(0)
    data = simulate(1024, g)
    sizes = [16, 64, 256, 1024]
    bound = chi2.ppf(1 - FAILURE, D)
    radii: dict[str, list[float]] = {"empirical_bayes": [], "maml": []}
    for J in sizes:
        for name, est in estimators(*(t[:J] for t in data)).items():
            assert est.covariance is not None
            assert float(est.squared_mahalanobis(THETA_STAR)) <= bound, (name, J)
            # Hence ‖θ̂ - θ*‖ ≤ √(λ_max(C_J) χ²_{D,1-1e-6}): a radius derived from the model.
            radius = float(torch.linalg.eigvalsh(est.covariance)[-1] * bound) ** 0.5
            assert float((est.theta - THETA_STAR).norm()) <= radius
            radii[name].append(radius)
    for name, r in radii.items():
        assert all(a > b for a, b in itertools.pairwise(r)), (name, r)
        # C_J ≈ C_1 / J, so 64 times more tasks shrink the radius by about 8.
        assert 6.0 < r[0] / r[-1] < 11.0, (name, r)
    # Exact empirical Bayes uses the true model and all the data: it is the more efficient.
    assert radii["empirical_bayes"][-1] < radii["maml"][-1]


def test_sampling_covariances_are_calibrated() -> None:
    """Over R = 300 replicate collections of J = 20 tasks, Σ_r (θ̂_r - θ*)ᵀ C_r⁻¹ (θ̂_r - θ*)
    ~ χ²_{RD}: the check fails if the covariances are too small *or* too large."""
    g = torch.Generator().manual_seed(1)
    R, J = 300, 20
    lo, hi = chi2.ppf(FAILURE, R * D), chi2.ppf(1 - FAILURE, R * D)
    for name, est in estimators(*simulate(J, g, replicates=(R,))).items():
        assert est.theta.shape == (R, D)
        total = float(est.squared_mahalanobis(THETA_STAR).sum())
        assert lo <= total <= hi, (name, lo, total, hi)


def test_fit_maml_lands_on_the_closed_form() -> None:
    """`fit(method="maml")` on the built-in linear model (no hyperprior: plain empirical Bayes),
    full-batch, converges to the closed-form MAML θ̂: the optimisation error is 1e-8, seven
    orders of magnitude below the sampling error."""
    g = torch.Generator().manual_seed(2)
    J = 40
    xs, ys, xq, yq = simulate(J, g)
    limit = largest_admissible_step_size(design_matrix(xs, bias=True), noise_scale=SIGMA)
    assert float(limit.min()) > STEP  # an inner step that implies a Gaussian prior for every task
    closed = estimators(xs, ys, xq, yq)["maml"]
    pyro.clear_param_store()
    model = BayesianLinearRegression(2, bias=True, noise_scale=SIGMA, hyperprior_scale=None)
    result = fit(
        model,
        TaskCollection.from_tensors(xs, ys, xq, yq),
        method="maml",
        meta_steps=600,
        meta_batch_size=J,
        inner_steps=STEPS,
        step_size=STEP,
        lr=0.05,
        seed=0,
        progress=False,
    )
    assert_close(result.theta, closed.theta, atol=1e-8, rtol=0.0)
    assert float(closed.squared_mahalanobis(THETA_STAR)) <= chi2.ppf(1 - FAILURE, D)


def test_evidence_maximisation_by_gradient_lands_on_the_closed_form() -> None:
    """Exact empirical Bayes as optimisation: L-BFGS on -Σ_j log p(y_j | θ) (autograd through
    the closed-form evidence) reaches the generalised-least-squares θ̂."""
    g = torch.Generator().manual_seed(3)
    xs, ys, xq, yq = simulate(50, g)
    X = design_matrix(torch.cat([xs, xq], 1), bias=True)
    y = torch.cat([ys, yq], 1)
    prior = PRIOR_SCALE**2 * torch.eye(D)
    theta = torch.zeros(D, requires_grad=True)
    optim = torch.optim.LBFGS(
        [theta],
        max_iter=100,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optim.zero_grad()
        loss = -log_evidence(theta, X, y, noise_scale=SIGMA, prior_covariance=prior).sum()
        loss.backward()
        return loss

    optim.step(closure)
    closed = empirical_bayes_theta(X, y, noise_scale=SIGMA, prior_covariance=prior)
    assert_close(theta.detach(), closed.theta, atol=1e-8, rtol=0.0)


def test_fit_llama_evidence_lands_on_the_closed_form_empirical_bayes() -> None:
    """`fit(method="llama", objective="evidence")`: the Laplace evidence with the GGN is exact
    on the linear-Gaussian model, so gradient-based meta-training reaches the closed-form
    evidence maximiser (generalised least squares over each task's support and query)."""
    g = torch.Generator().manual_seed(4)
    J = 40
    xs, ys, xq, yq = simulate(J, g)
    closed = estimators(xs, ys, xq, yq)["empirical_bayes"]
    pyro.clear_param_store()
    model = BayesianLinearRegression(
        2, bias=True, noise_scale=SIGMA, prior_scale=PRIOR_SCALE, hyperprior_scale=None
    )
    result = fit(
        model,
        TaskCollection.from_tensors(xs, ys, xq, yq),
        method="llama",
        objective="evidence",
        curvature="ggn",
        meta_steps=600,
        meta_batch_size=J,
        inner_steps=STEPS,
        step_size=STEP,
        lr=0.05,
        seed=0,
        progress=False,
    )
    assert_close(result.theta, closed.theta, atol=1e-8, rtol=0.0)


def test_linear_experiment_writes_its_metrics_and_figures(tmp_path: Path) -> None:
    """`python -m hierbayes linear`, small: the metrics the issue asks for, and both PNGs."""
    config = LinearConfig(problems=18, task_counts=(8, 64), replicates=20, fit_steps=300)
    metrics = run_linear(config, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["problems_checked"] == 18
    assert 0.0 <= written["max_abs_gd_vs_map"] < 1e-10
    recovery = written["theta_recovery"]
    assert recovery["J"] == [8, 64]
    for name in ("empirical_bayes", "maml"):
        rms, predicted = recovery[name]["rms_error"], recovery[name]["predicted_rms_error"]
        assert rms[1] < rms[0] and predicted[1] < predicted[0]
    assert max(recovery["fit_maml"]["max_abs_vs_closed_form"]) < 1e-6
    for figure in ("gd_paths.png", "theta_recovery.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["max_abs_gd_vs_map"] == written["max_abs_gd_vs_map"]
