"""Linear-Gaussian exactness (MATH.md §3): k gradient steps are MAP under the implied prior.

Every test checks a closed form against an independent computation in float64: the gradient
descent loop against the posterior mean under N(θ, Q), the eigen-formula for Q against its
eigenvector-free series form, the closed-form evidence against Monte Carlo and the Laplace
identity, the closed-form estimators of θ against autograd on their own objectives.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference import TruncatedGradientGuide
from hierbayes.inference.linear_gaussian import (
    InadmissibleStepSizeError,
    design_matrix,
    empirical_bayes_theta,
    gradient_descent_affine_map,
    gradient_descent_iterate,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
    log_evidence,
    maml_theta,
    posterior,
)
from hierbayes.models import BayesianLinearRegression

# Machine-precision tolerance of the issue. Float64 rounding is ~1e-16 relative; every
# quantity compared here is computed in O(k + D) well-conditioned operations, so 1e-10
# relative to the size of the numbers compared leaves a margin of ~1e4 and still fails on
# any algebraic mistake (those show up at 1e-3 or worse).
EXACT = 1e-10


# -- random problems ----------------------------------------------------------------------------


def random_design(N: int, D: int, rank: int, scale: float, g: torch.Generator) -> Tensor:
    """An N × D matrix of exactly the given rank (a product of N × r and r × D Gaussians)."""
    if rank == 0:
        return torch.zeros(N, D)
    return scale * torch.randn(N, rank, generator=g) @ torch.randn(rank, D, generator=g)


def random_preconditioner(kind: str, D: int, g: torch.Generator) -> Tensor | None:
    if kind == "none":
        return None
    if kind == "diagonal":
        return torch.exp(torch.randn(D, generator=g))
    W = torch.randn(D, D, generator=g)
    return W @ W.T / D + 0.1 * torch.eye(D)


REGIMES = ["over-determined", "under-determined", "rank-deficient"]
PRECONDITIONERS = ["none", "diagonal", "full"]
log_uniform = lambda lo, hi: st.floats(math.log(lo), math.log(hi)).map(math.exp)  # noqa: E731


@st.composite
def problems(draw: Any, regime: str, preconditioner: str) -> dict[str, Any]:
    """A linear task, k, σ, B and an admissible α = fraction / λ_max."""
    if regime == "over-determined":  # N > D, full column rank
        D = draw(st.integers(1, 6))
        N = draw(st.integers(D + 1, D + 6))
        rank = D
    elif regime == "under-determined":  # N < D, full row rank
        D = draw(st.integers(2, 7))
        N = draw(st.integers(1, D - 1))
        rank = N
    else:  # rank < min(N, D), the zero matrix included
        N = draw(st.integers(1, 8))
        D = draw(st.integers(1, 7))
        rank = draw(st.integers(0, min(N, D) - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    X = random_design(N, D, rank, draw(log_uniform(0.1, 10.0)), g)
    sigma = draw(log_uniform(0.05, 5.0))
    B = random_preconditioner(preconditioner, D, g)
    steps = draw(st.integers(1, 15))
    fraction = draw(st.floats(0.01, 0.99))
    limit = float(largest_admissible_step_size(X, noise_scale=sigma, preconditioner=B))
    alpha = fraction * limit if math.isfinite(limit) else fraction
    theta = 3.0 * torch.randn(D, generator=g)
    y = X @ torch.randn(D, generator=g) + sigma * torch.randn(N, generator=g)
    # κ = (1 - αλ_max)^(-k) = 1 + λ_max q_max: the spread of the implied prior's variances.
    kappa = (1.0 - fraction) ** (-steps) if math.isfinite(limit) else 1.0
    return dict(X=X, y=y, theta=theta, sigma=sigma, B=B, k=steps, alpha=alpha, kappa=kappa)


def options(p: dict[str, Any]) -> dict[str, Any]:
    return dict(noise_scale=p["sigma"], step_size=p["alpha"], steps=p["k"], preconditioner=p["B"])


# -- the theorem ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
@pytest.mark.parametrize("regime", REGIMES)
@settings(max_examples=60)
@given(data=st.data())
def test_gradient_descent_iterate_is_map_under_implied_prior(
    regime: str, preconditioner: str, data: st.DataObject
) -> None:
    p = data.draw(problems(regime, preconditioner))
    gd = gradient_descent_iterate(p["theta"], p["X"], p["y"], **options(p))
    precision = implied_prior_precision(p["X"], **options(p))
    map_ = posterior(p["theta"], p["X"], p["y"], noise_scale=p["sigma"], prior_precision=precision)
    scale = 1.0 + float(gd.abs().max())
    assert_close(map_.mean, gd, atol=EXACT * scale, rtol=0.0)

    # The covariance ("Kalman") form of the same MAP. Q spans variances from kα to κ/λ_max, and
    # forming Q already rounds its small directions by ε‖Q‖, so this route is exact only up to
    # a factor κ = (1 - αλ_max)^(-k): the reason posterior() also takes the precision. Beyond
    # κ ~ 1/ε, σ²I + XQXᵀ is numerically singular and this route cannot be used at all.
    if p["kappa"] > 1e8:
        return
    Q = implied_prior_covariance(p["X"], **options(p))
    kalman = posterior(p["theta"], p["X"], p["y"], noise_scale=p["sigma"], prior_covariance=Q)
    assert_close(kalman.mean, gd, atol=EXACT * scale * p["kappa"], rtol=0.0)


@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
@pytest.mark.parametrize("regime", REGIMES)
@settings(max_examples=30)
@given(data=st.data())
def test_implied_covariance_equals_its_eigenvector_free_series(
    regime: str, preconditioner: str, data: st.DataObject
) -> None:
    r"""Q = α Σ_{i=1}^k (I - αBG)^{-i} B with G = XᵀX/σ², and Q Q^{-1} = I."""
    p = data.draw(problems(regime, preconditioner))
    X, B, alpha, k = p["X"], p["B"], p["alpha"], p["k"]
    D = X.shape[-1]
    Bm = torch.eye(D) if B is None else (torch.diag(B) if B.dim() == 1 else B)
    M_inv = torch.linalg.inv(torch.eye(D) - alpha * Bm @ X.T @ X / p["sigma"] ** 2)
    series = torch.zeros(D, D)
    power = torch.eye(D)
    for _ in range(k):
        power = power @ M_inv
        series = series + alpha * power @ Bm
    Q = implied_prior_covariance(X, **options(p))
    size = float(series.abs().max())
    assert_close(Q, series, atol=EXACT * size, rtol=0.0)
    P = implied_prior_precision(X, **options(p))
    # P Q = I holds to ε times the condition number of Q, which is at most κ·cond(B).
    cond_B = 1.0 if B is None else float(torch.linalg.cond(Bm))
    assert_close(P @ Q, torch.eye(D), atol=EXACT * p["kappa"] * cond_B, rtol=0.0)


@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_unseen_directions_keep_variance_k_alpha(preconditioner: str) -> None:
    r"""Where the data are blind (Xv = 0) the prior variance is kα, scaled by B: QB⁻¹v = kα v."""
    g = torch.Generator().manual_seed(1)
    N, D, rank, k = 4, 6, 3, 7
    X = random_design(N, D, rank, 1.0, g)
    B = random_preconditioner(preconditioner, D, g)
    alpha = 0.6 * float(largest_admissible_step_size(X, noise_scale=0.3, preconditioner=B))
    Bm = torch.eye(D) if B is None else (torch.diag(B) if B.dim() == 1 else B)
    Q = implied_prior_covariance(X, noise_scale=0.3, step_size=alpha, steps=k, preconditioner=B)
    _, _, Vh = torch.linalg.svd(X)
    null = Vh[rank:].T  # (D, D - rank), X @ null = 0
    assert_close(X @ null, torch.zeros(N, D - rank), atol=1e-12, rtol=0.0)
    assert_close(Q @ torch.linalg.inv(Bm) @ null, k * alpha * null, atol=1e-12, rtol=0.0)
    # An exactly-zero input column: its prior variance is exactly kα b_i, its covariances 0.
    X0 = torch.cat([torch.randn(N, 2, generator=g), torch.zeros(N, 1)], dim=1)
    b = torch.tensor([0.5, 2.0, 3.0])
    Q0 = implied_prior_covariance(X0, noise_scale=1.0, step_size=0.05, steps=4, preconditioner=b)
    assert_close(Q0[2], torch.tensor([0.0, 0.0, 4 * 0.05 * 3.0]), atol=1e-15, rtol=0.0)


def test_small_eigenvalues_are_continuous_with_the_zero_limit() -> None:
    """As a column shrinks to zero its q_i tends to kα smoothly: no cancellation, no jump."""
    k, alpha = 5, 0.02
    base = torch.tensor([[1.0, 0.3], [0.2, 1.0], [0.5, -0.4]])
    for eps in (1e-2, 1e-4, 1e-6, 1e-9, 0.0):
        X = base * torch.tensor([1.0, eps])
        Q = implied_prior_covariance(X, noise_scale=1.0, step_size=alpha, steps=k)
        # q = ((1 - αλ)^{-k} - 1)/λ = kα + k(k+1)α²λ/2 + O(λ²), with λ ≈ ε²‖column‖².
        assert abs(float(Q[1, 1]) - k * alpha) <= k * (k + 1) * alpha**2 * max(eps, 1e-30) ** 2 * 2
        M = torch.eye(2) - alpha * X.T @ X
        series = sum(alpha * torch.linalg.matrix_power(torch.linalg.inv(M), i) for i in range(1, 6))
        assert_close(Q, series, atol=1e-14, rtol=0.0)


def test_inadmissible_step_size_is_a_clear_error() -> None:
    X = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # XᵀX/σ² = diag(4, 1) with σ = 1: λ_max = 4
    assert float(largest_admissible_step_size(X, noise_scale=1.0)) == pytest.approx(0.25)
    ok = implied_prior_covariance(X, noise_scale=1.0, step_size=0.2499, steps=3)
    assert bool(torch.isfinite(ok).all())
    with pytest.raises(InadmissibleStepSizeError, match=r"λ_max = 4\b.*1/λ_max = 0\.25\b") as err:
        implied_prior_covariance(X, noise_scale=1.0, step_size=0.3, steps=3)
    assert isinstance(err.value, ValueError)
    assert err.value.largest_admissible_step_size == pytest.approx(0.25)
    assert err.value.task is None
    with pytest.raises(InadmissibleStepSizeError, match="no Gaussian prior"):
        implied_prior_precision(X, noise_scale=1.0, step_size=0.25, steps=1)  # αλ = 1 exactly
    # Batched: the message names the first offending task and the bound over all tasks.
    Xb = torch.stack([X / 4, X, 2 * X])  # λ_max = 0.25, 4, 16
    with pytest.raises(InadmissibleStepSizeError, match=r"task 1 .*1/λ_max = 0\.0625") as err:
        implied_prior_covariance(Xb, noise_scale=1.0, step_size=0.3, steps=2)
    assert err.value.task == 1
    # A preconditioner changes λ_max: B = diag(1/4, 1) makes BXᵀX = I, so α < 1 is admissible.
    B = torch.tensor([0.25, 1.0])
    assert float(largest_admissible_step_size(X, noise_scale=1.0, preconditioner=B)) == 1.0


@pytest.mark.parametrize("steps", [1, 3])
def test_beyond_the_bound_odd_k_overshoots_where_no_prior_can_reach(steps: int) -> None:
    """What the error claims: with 1 < αλ < 2 and odd k, gradient descent converges but lands
    beyond the least-squares solution, while the MAP under any N(θ, q) (q > 0) lies strictly
    between θ and it."""
    X = torch.tensor([[1.0]])
    y = torch.tensor([2.0])
    theta = torch.tensor([0.0])
    alpha = 1.5  # λ = 1, αλ = 1.5
    phi = gradient_descent_iterate(theta, X, y, noise_scale=1.0, step_size=alpha, steps=steps)
    assert float(phi) > 2.0  # overshoot: (1 - αλ)^k = (-0.5)^k < 0
    for q in (1e-3, 1.0, 1e3):
        mean = posterior(theta, X, y, noise_scale=1.0, prior_covariance=torch.tensor([[q]])).mean
        assert 0.0 < float(mean) < 2.0


def test_invalid_preconditioners_are_rejected() -> None:
    X = torch.randn(3, 2)
    with pytest.raises(ValueError, match="positive definite"):
        implied_prior_covariance(
            X, noise_scale=1.0, step_size=0.01, steps=1, preconditioner=torch.tensor([1.0, -1.0])
        )
    with pytest.raises(ValueError, match="symmetric"):
        implied_prior_covariance(
            X,
            noise_scale=1.0,
            step_size=0.01,
            steps=1,
            preconditioner=torch.tensor([[1.0, 0.5], [0.0, 1.0]]),
        )
    with pytest.raises(ValueError, match="not positive definite"):
        implied_prior_covariance(
            X,
            noise_scale=1.0,
            step_size=0.01,
            steps=1,
            preconditioner=torch.tensor([[1.0, 2.0], [2.0, 1.0]]),
        )
    with pytest.raises(ValueError, match=r"shape \(2,\) \(diagonal\) or \(2, 2\)"):
        gradient_descent_iterate(
            torch.zeros(2),
            X,
            torch.zeros(3),
            noise_scale=1.0,
            step_size=0.1,
            steps=1,
            preconditioner=torch.ones(3, 3),
        )


# -- the spine's guide on the built-in model ------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("learn_step_size", ["fixed", "per_parameter"])
def test_guide_on_linear_model_lands_on_the_map(bias: bool, learn_step_size: str) -> None:
    """TruncatedGradientGuide on BayesianLinearRegression is k-step GD, hence MAP under N(θ, Q);
    per-parameter step sizes a are the diagonal preconditioner (α = 1, B = diag(a))."""
    g = torch.Generator().manual_seed(2)
    T, N, d, k, sigma = 5, 4, 3, 4, 0.7
    x = torch.randn(T, N, d, generator=g)
    y = torch.randn(T, N, 1, generator=g)
    model = BayesianLinearRegression(d, bias=bias, noise_scale=sigma, learn_noise=False)
    D = d + int(bias)
    X = design_matrix(x, bias=bias)
    limit = float(largest_admissible_step_size(X, noise_scale=sigma).min())
    guide = TruncatedGradientGuide(
        model,
        (x, y),
        inner_steps=k,
        step_size=0.5 * limit,
        learn_step_size=learn_step_size,  # type: ignore[arg-type]
    )
    if learn_step_size == "per_parameter":
        a = 0.5 * limit * torch.exp(0.5 * torch.randn(D, generator=g))
        with torch.no_grad():
            guide.step_size_param_unconstrained.copy_(torch.log(a))
        assert_close(guide.step_size, a)
        step, B = 1.0, a
    else:
        step, B = 0.5 * limit, None
    theta = torch.randn(D, generator=g)
    phi_guide = guide.adapt({"theta": theta}, x, y)
    assert phi_guide.shape == (T, D)

    phi_gd = gradient_descent_iterate(
        theta, X, y, noise_scale=sigma, step_size=step, steps=k, preconditioner=B
    )
    P = implied_prior_precision(X, noise_scale=sigma, step_size=step, steps=k, preconditioner=B)
    map_ = posterior(theta, X, y, noise_scale=sigma, prior_precision=P).mean
    scale = 1.0 + float(phi_gd.abs().max())
    assert_close(phi_guide, phi_gd, atol=EXACT * scale, rtol=0.0)
    assert_close(phi_guide, map_, atol=EXACT * scale, rtol=0.0)


# -- posterior and evidence ------------------------------------------------------------------------


def _spd(D: int, g: torch.Generator) -> Tensor:
    W = torch.randn(D, D, generator=g)
    return W @ W.T / D + 0.2 * torch.eye(D)


@pytest.mark.parametrize(("N", "D"), [(6, 3), (2, 4)])
def test_posterior_covariance_and_precision_forms_agree(N: int, D: int) -> None:
    g = torch.Generator().manual_seed(3)
    X, y, theta, sigma = (
        torch.randn(N, D, generator=g),
        torch.randn(N, generator=g),
        torch.randn(D, generator=g),
        0.8,
    )
    Q = _spd(D, g)
    by_cov = posterior(theta, X, y, noise_scale=sigma, prior_covariance=Q)
    by_prec = posterior(theta, X, y, noise_scale=sigma, prior_precision=torch.linalg.inv(Q))
    H = X.T @ X / sigma**2 + torch.linalg.inv(Q)
    assert_close(by_cov.mean, by_prec.mean, atol=EXACT, rtol=EXACT)
    assert_close(by_cov.covariance, by_prec.covariance, atol=EXACT, rtol=EXACT)
    assert_close(by_cov.precision, H, atol=EXACT * float(H.abs().max()), rtol=0.0)
    assert_close(by_prec.precision, H, atol=EXACT * float(H.abs().max()), rtol=0.0)
    # The mean is the stationary point of the log joint: X^T(y - Xμ)/σ² = Q^{-1}(μ - θ).
    mu = by_cov.mean
    assert_close(
        X.T @ (y - X @ mu) / sigma**2, torch.linalg.solve(Q, mu - theta), atol=EXACT, rtol=0.0
    )


def test_log_evidence_equals_monte_carlo_average_of_the_likelihood() -> None:
    r"""log p(y|θ) = log E_{φ~N(θ,Q)} N(y; Xφ, σ²I), estimated by log-mean-exp over 400,000
    prior draws. The standard error of the log of the mean is sd(w)/(√S mean(w)) (delta
    method) with w the likelihood values; we accept 5 standard errors (two-sided p ≈ 6e-7)."""
    g = torch.Generator().manual_seed(4)
    N, D, sigma = 3, 2, 0.9
    X, y, theta = (
        torch.randn(N, D, generator=g),
        torch.randn(N, generator=g),
        torch.randn(D, generator=g),
    )
    Q = _spd(D, g)
    exact = float(log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=Q))
    S = 400_000
    phi = theta + torch.randn(S, D, generator=g) @ torch.linalg.cholesky(Q).T
    log_w = (
        -0.5 * ((y - phi @ X.T) / sigma).square().sum(-1)
        - N * math.log(sigma)
        - 0.5 * N * math.log(2 * math.pi)
    )
    estimate = float(torch.logsumexp(log_w, 0) - math.log(S))
    w = torch.exp(log_w - log_w.max())
    se = float(w.std() / (math.sqrt(S) * w.mean()))
    assert se < 5e-3  # the check has power: a wrong evidence is off by far more than this
    assert abs(estimate - exact) < 5 * se, (estimate, exact, se)
    # The same number from a wrong marginal covariance is many standard errors away.
    wrong = float(log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=2 * Q))
    assert abs(estimate - wrong) > 20 * se


def test_log_evidence_satisfies_the_laplace_identity() -> None:
    r"""Exact for the linear-Gaussian model (MATH.md §4):
    log p(y|θ) = log p(y|μ) + log N(μ; θ, Q) + (D/2) log 2π - ½ log det H."""
    g = torch.Generator().manual_seed(5)
    N, D, sigma = 5, 3, 0.6
    X, y, theta = (
        torch.randn(N, D, generator=g),
        torch.randn(N, generator=g),
        torch.randn(D, generator=g),
    )
    Q = _spd(D, g)
    post = posterior(theta, X, y, noise_scale=sigma, prior_covariance=Q)
    mu = post.mean
    log_lik = torch.distributions.Normal(X @ mu, sigma).log_prob(y).sum()
    log_prior = torch.distributions.MultivariateNormal(theta, Q).log_prob(mu)
    logdet_H = 2 * torch.log(torch.diagonal(torch.linalg.cholesky(post.precision))).sum()
    laplace = log_lik + log_prior + 0.5 * D * math.log(2 * math.pi) - 0.5 * logdet_H
    exact = log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=Q)
    assert_close(exact, laplace, atol=EXACT, rtol=EXACT)
    reference = torch.distributions.MultivariateNormal(
        X @ theta, sigma**2 * torch.eye(N) + X @ Q @ X.T
    )
    assert_close(exact, reference.log_prob(y), atol=EXACT, rtol=EXACT)


def test_log_evidence_gradient_in_theta() -> None:
    r"""∇_θ log p(y|θ) = Xᵀ S^{-1}(y - Xθ), S = σ²I + XQXᵀ."""
    g = torch.Generator().manual_seed(6)
    N, D, sigma = 4, 3, 0.5
    X, y = torch.randn(N, D, generator=g), torch.randn(N, generator=g)
    theta = torch.randn(D, generator=g).requires_grad_(True)
    Q = _spd(D, g)
    (grad,) = torch.autograd.grad(
        log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=Q), theta
    )
    S = sigma**2 * torch.eye(N) + X @ Q @ X.T
    assert_close(grad, X.T @ torch.linalg.solve(S, y - X @ theta.detach()), atol=EXACT, rtol=EXACT)


def test_batched_equals_looped_over_tasks() -> None:
    g = torch.Generator().manual_seed(7)
    T, N, D, sigma, k = 6, 4, 3, 0.8, 3
    X, y = torch.randn(T, N, D, generator=g), torch.randn(T, N, 1, generator=g)
    theta = torch.randn(D, generator=g)
    B = torch.exp(torch.randn(D, generator=g))
    alpha = 0.5 * float(largest_admissible_step_size(X, noise_scale=sigma, preconditioner=B).min())
    opts: dict[str, Any] = dict(noise_scale=sigma, step_size=alpha, steps=k, preconditioner=B)
    Q = implied_prior_covariance(X, **opts)
    phi = gradient_descent_iterate(theta, X, y, **opts)
    post = posterior(theta, X, y, noise_scale=sigma, prior_covariance=Q)
    ev = log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=Q)
    for j in range(T):
        assert_close(Q[j], implied_prior_covariance(X[j], **opts), atol=EXACT, rtol=EXACT)
        assert_close(phi[j], gradient_descent_iterate(theta, X[j], y[j, :, 0], **opts))
        pj = posterior(theta, X[j], y[j], noise_scale=sigma, prior_covariance=Q[j])
        assert_close(post.mean[j], pj.mean, atol=EXACT, rtol=EXACT)
        assert_close(post.covariance[j], pj.covariance, atol=EXACT, rtol=EXACT)
        assert_close(
            ev[j], log_evidence(theta, X[j], y[j], noise_scale=sigma, prior_covariance=Q[j])
        )


def test_gradient_descent_is_an_affine_map_of_theta_and_targets() -> None:
    g = torch.Generator().manual_seed(8)
    T, N, D, sigma, k, alpha = 3, 5, 4, 0.7, 4, 0.02
    X, y = torch.randn(T, N, D, generator=g), torch.randn(T, N, generator=g)
    B = _spd(D, g)
    amap = gradient_descent_affine_map(
        X, noise_scale=sigma, step_size=alpha, steps=k, preconditioner=B
    )
    theta = torch.randn(D, generator=g)
    phi = gradient_descent_iterate(
        theta, X, y, noise_scale=sigma, step_size=alpha, steps=k, preconditioner=B
    )
    assert_close(amap(theta.expand(T, D), y), phi, atol=EXACT, rtol=EXACT)
    # θ is a fixed point on noise-free targets y = Xθ, hence C X = I - A.
    assert_close(amap.target_matrix @ X, torch.eye(D) - amap.theta_matrix, atol=EXACT, rtol=0.0)
    # A is the Jacobian of the iterate with respect to θ (autograd through the loop).
    jac = torch.autograd.functional.jacobian(
        lambda t: gradient_descent_iterate(
            t, X[0], y[0], noise_scale=sigma, step_size=alpha, steps=k, preconditioner=B
        ),
        theta,
    )
    assert_close(jac, amap.theta_matrix[0], atol=EXACT, rtol=0.0)


# -- the estimators of θ against their own objectives ----------------------------------------------


def _tasks(J: int, N: int, M: int, D: int, g: torch.Generator) -> tuple[Tensor, ...]:
    theta = torch.randn(D, generator=g)
    phi = theta + torch.randn(J, D, generator=g)
    Xs, Xq = torch.randn(J, N, D, generator=g), torch.randn(J, M, D, generator=g)
    ys = (Xs @ phi[..., None])[..., 0] + 0.5 * torch.randn(J, N, generator=g)
    yq = (Xq @ phi[..., None])[..., 0] + 0.5 * torch.randn(J, M, generator=g)
    return Xs, ys, Xq, yq


def test_empirical_bayes_theta_maximises_the_summed_evidence() -> None:
    g = torch.Generator().manual_seed(9)
    J, N, D, sigma = 12, 4, 3, 0.5
    X, y, _, _ = _tasks(J, N, 1, D, g)
    Q = torch.stack([_spd(D, g) for _ in range(J)])  # a prior covariance per task
    est = empirical_bayes_theta(X, y, noise_scale=sigma, prior_covariance=Q)

    def total(theta: Tensor) -> Tensor:
        return log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=Q).sum()

    theta = est.theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(total(theta), theta)
    assert_close(grad, torch.zeros(D), atol=EXACT * J, rtol=0.0)
    hessian = torch.autograd.functional.hessian(total, est.theta)
    assert est.covariance is not None
    assert_close(est.covariance, torch.linalg.inv(-hessian), atol=EXACT, rtol=EXACT)


def test_maml_theta_minimises_the_maml_objective() -> None:
    g = torch.Generator().manual_seed(10)
    J, N, M, D, sigma, k, alpha = 10, 4, 6, 3, 0.5, 3, 0.01
    Xs, ys, Xq, yq = _tasks(J, N, M, D, g)
    B = torch.exp(0.3 * torch.randn(D, generator=g))
    est = maml_theta(Xs, ys, Xq, yq, noise_scale=sigma, step_size=alpha, steps=k, preconditioner=B)

    def query_nll(theta: Tensor) -> Tensor:
        phi = gradient_descent_iterate(
            theta, Xs, ys, noise_scale=sigma, step_size=alpha, steps=k, preconditioner=B
        )
        return ((yq - (Xq @ phi[..., None])[..., 0]) ** 2).sum() / (2 * sigma**2)

    theta = est.theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(query_nll(theta), theta)
    assert_close(grad, torch.zeros(D), atol=EXACT * J, rtol=0.0)
    # And it is a minimum: the objective rises in every direction.
    for v in torch.eye(D):
        assert float(query_nll(est.theta + 1e-3 * v)) > float(query_nll(est.theta))


@pytest.mark.parametrize("estimator", ["empirical_bayes", "maml"])
def test_sampling_covariance_is_the_exact_linear_propagation(estimator: str) -> None:
    r"""θ̂ is linear in the standard-normal draws z (task effects, support and query noise),
    θ̂ = θ* + W z given the inputs; so Cov θ̂ = W diag(var z) Wᵀ exactly, with W from autograd."""
    g = torch.Generator().manual_seed(11)
    J, N, M, D, sigma, s, k, alpha = 6, 4, 5, 3, 0.4, 0.8, 2, 0.01
    Xs, Xq = torch.randn(J, N, D, generator=g), torch.randn(J, M, D, generator=g)
    theta_star = torch.randn(D, generator=g)
    Sigma_phi = s**2 * torch.eye(D)

    def estimate(z: Tensor) -> Tensor:
        u, es, eq = (
            z[: J * D].reshape(J, D),
            z[J * D : J * (D + N)].reshape(J, N),
            z[J * (D + N) :].reshape(J, M),
        )
        phi = theta_star + s * u
        ys = (Xs @ phi[..., None])[..., 0] + sigma * es
        yq = (Xq @ phi[..., None])[..., 0] + sigma * eq
        if estimator == "maml":
            return maml_theta(Xs, ys, Xq, yq, noise_scale=sigma, step_size=alpha, steps=k).theta
        X, y = torch.cat([Xs, Xq], 1), torch.cat([ys, yq], 1)
        return empirical_bayes_theta(X, y, noise_scale=sigma, prior_covariance=Sigma_phi).theta

    z0 = torch.zeros(J * (D + N + M))
    assert_close(
        estimate(z0), theta_star, atol=EXACT, rtol=0.0
    )  # unbiased: noise-free data give θ*
    W = torch.autograd.functional.jacobian(estimate, z0)
    propagated = W @ W.T
    if estimator == "maml":
        cov = maml_theta(
            Xs,
            Xs @ theta_star,
            Xq,
            Xq @ theta_star,
            noise_scale=sigma,
            step_size=alpha,
            steps=k,
            generative_prior_covariance=Sigma_phi,
        ).covariance
    else:
        X = torch.cat([Xs, Xq], 1)
        cov = empirical_bayes_theta(
            X, X @ theta_star, noise_scale=sigma, prior_covariance=Sigma_phi
        ).covariance
    assert cov is not None
    assert_close(cov, propagated, atol=EXACT, rtol=EXACT)


def test_differentiable_in_theta_and_step_size() -> None:
    """Finite-difference gradient checks (float64): the iterate, the MAP and the evidence in θ,
    the implied covariance in α (a learned step size is a learned prior)."""
    g = torch.Generator().manual_seed(12)
    N, D, sigma, k = 4, 3, 0.7, 3
    X, y = torch.randn(N, D, generator=g), torch.randn(N, generator=g)
    B = torch.exp(0.3 * torch.randn(D, generator=g))
    alpha0 = 0.5 * float(largest_admissible_step_size(X, noise_scale=sigma, preconditioner=B))
    theta = torch.randn(D, generator=g, requires_grad=True)
    alpha = torch.tensor(alpha0, requires_grad=True)
    Q = implied_prior_covariance(X, noise_scale=sigma, step_size=alpha0, steps=k, preconditioner=B)

    def iterate(t: Tensor, a: Tensor) -> Tensor:
        return gradient_descent_iterate(
            t, X, y, noise_scale=sigma, step_size=a, steps=k, preconditioner=B
        )

    assert torch.autograd.gradcheck(iterate, (theta, alpha))
    assert torch.autograd.gradcheck(
        lambda t: posterior(t, X, y, noise_scale=sigma, prior_covariance=Q).mean, (theta,)
    )
    assert torch.autograd.gradcheck(
        lambda t: log_evidence(t, X, y, noise_scale=sigma, prior_covariance=Q), (theta,)
    )
    assert torch.autograd.gradcheck(
        lambda a: implied_prior_covariance(
            X, noise_scale=sigma, step_size=a, steps=k, preconditioner=B
        ),
        (alpha,),
    )
