"""Laplace evidence and posteriors: exactness on the linear-Gaussian model, gradients of the
LLAMA objectives against finite differences, and the predictive distributions."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch.testing import assert_close

from hierbayes.inference import TruncatedGradientGuide, fit
from hierbayes.inference.core.evidence import laplace_log_evidence
from hierbayes.inference.core.laplace import linearized_predictive
from hierbayes.inference.curvature import CurvatureInputs, build_curvature
from hierbayes.inference.objectives import (
    LaplaceEvidenceObjective,
    LaplacePenaltyObjective,
    LinearizedPredictiveObjective,
    llama_objective,
)
from hierbayes.inference.posteriors.laplace import LaplacePosterior, laplace_posterior
from hierbayes.models import (
    BayesianLinearRegression,
    NeuralRegression,
    model_structure,
    task_density,
)
from hierbayes.tasks import SinusoidTasks
from tests.helpers import regression_batch, tiny_mlp

TOL = dict(atol=1e-8, rtol=1e-8)


def closed_form_log_evidence(
    X: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, sigma: float, s: float
) -> torch.Tensor:
    r""":math:`\log\mathcal N(y; X\theta, \sigma^2 I + s^2 XX^\top)` per task (MATH.md §3)."""
    N = X.shape[1]
    cov = sigma**2 * torch.eye(N) + s**2 * X @ X.transpose(1, 2)
    r = (y.squeeze(-1) - X @ theta).unsqueeze(-1)
    chol = torch.linalg.cholesky(cov)
    quad = torch.cholesky_solve(r, chol).squeeze(-1).mul(r.squeeze(-1)).sum(-1)
    return (
        -0.5 * quad
        - torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1)
        - 0.5 * N * math.log(2 * math.pi)
    )


def linear_setup(d: int = 3, sigma: float = 0.5, s: float = 0.8):  # type: ignore[no-untyped-def]
    batch = regression_batch(T=4, N=6, d=d)
    model = BayesianLinearRegression(d, bias=True, noise_scale=sigma, prior_scale=s)
    structure = model_structure(model, batch.support_x, batch.support_y)
    density = task_density(model, structure)
    theta = torch.randn(d + 1)
    X = torch.cat([batch.support_x, torch.ones(4, 6, 1)], dim=-1)
    return batch, model, density, {"theta": theta}, X


@pytest.mark.parametrize("curvature", ["ggn", "full"])
def test_laplace_evidence_is_exact_on_the_linear_gaussian_model(curvature: str) -> None:
    sigma, s = 0.5, 0.8
    batch, _model, density, params, X = linear_setup(sigma=sigma, s=s)
    expected = closed_form_log_evidence(X, batch.support_y, params["theta"], sigma, s)
    # at an arbitrary point, with the one-Newton-step correction
    phi = torch.randn(4, 4)
    got = laplace_log_evidence(
        density, params, phi, batch.support_x, batch.support_y, curvature=curvature
    )
    assert_close(got, expected, **TOL)
    # at the mode the classical Laplace evidence (no correction) is exact
    H = X.transpose(1, 2) @ X / sigma**2 + torch.eye(4) / s**2
    mode = torch.linalg.solve(
        H, (X.transpose(1, 2) @ batch.support_y).squeeze(-1) / sigma**2 + params["theta"] / s**2
    )
    at_mode = laplace_log_evidence(
        density,
        params,
        mode,
        batch.support_x,
        batch.support_y,
        curvature=curvature,
        newton_correction=False,
    )
    assert_close(at_mode, expected, **TOL)
    # away from the mode the uncorrected formula is not exact: the correction matters
    off = laplace_log_evidence(
        density,
        params,
        phi,
        batch.support_x,
        batch.support_y,
        curvature=curvature,
        newton_correction=False,
    )
    assert (off - expected).abs().min() > 1e-3


def test_laplace_posterior_is_the_exact_posterior_on_the_linear_model() -> None:
    sigma, s = 0.5, 0.8
    batch, _model, density, params, X = linear_setup(sigma=sigma, s=s)
    H = X.transpose(1, 2) @ X / sigma**2 + torch.eye(4) / s**2
    mean = torch.linalg.solve(
        H, (X.transpose(1, 2) @ batch.support_y).squeeze(-1) / sigma**2 + params["theta"] / s**2
    )
    posterior = laplace_posterior(density, params, mean, batch.support_x, batch.support_y)
    assert_close(posterior.covariance(), torch.linalg.inv(H), **TOL)
    # the linearised predictive of a linear model is its exact posterior predictive
    Xq = torch.cat([batch.query_x, torch.ones(4, 5, 1)], dim=-1)
    prediction = posterior.predict(batch.query_x)
    assert_close(prediction.mean.squeeze(-1), (Xq @ mean.unsqueeze(-1)).squeeze(-1), **TOL)
    exact_var = (Xq @ torch.linalg.inv(H) * Xq).sum(-1) + sigma**2
    assert_close(prediction.variance.squeeze(-1), exact_var, **TOL)
    sampled = posterior.predict(
        batch.query_x,
        method="sampled",
        num_samples=20000,
        generator=torch.Generator().manual_seed(0),
    )
    assert_close(sampled.mean, prediction.mean, atol=0.03, rtol=0)
    assert_close(sampled.variance, prediction.variance, atol=0, rtol=0.05)


@pytest.mark.parametrize("curvature", ["ggn", "kfac", "diag", "full"])
def test_linearized_variance_matches_the_dense_formula(curvature: str) -> None:
    batch = regression_batch(T=2, N=5)
    model = NeuralRegression(tiny_mlp(4))
    structure = model_structure(model, batch.support_x, batch.support_y)
    density = task_density(model, structure)
    params = {"theta": model.theta_init, "noise_scale": torch.tensor(0.4)}
    phi = model.theta_init + 0.2 * torch.randn(2, structure.num_params)
    P = torch.full((structure.num_params,), 4.0)
    inputs = CurvatureInputs(density, params, phi, batch.support_x, batch.support_y, None, P, False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        estimate = build_curvature(curvature, inputs)
    prediction = linearized_predictive(estimate, inputs, batch.query_x)
    phi_leaf = phi.clone().requires_grad_(True)
    f = model.net(phi_leaf, batch.query_x)
    J = torch.stack(
        [
            torch.autograd.grad(f[:, m, 0].sum(), phi_leaf, retain_graph=True)[0]
            for m in range(f.shape[1])
        ],
        1,
    )
    cov = torch.linalg.inv(estimate.to_dense())
    expected = (J @ cov * J).sum(-1) + 0.16
    assert_close(prediction.variance.squeeze(-1), expected, **TOL)


OBJECTIVES = {
    "paper-ggn": lambda: LaplacePenaltyObjective(eta=0.3, curvature="ggn"),
    "paper-kfac": lambda: LaplacePenaltyObjective(eta=0.3, curvature="kfac"),
    "paper-diag": lambda: LaplacePenaltyObjective(eta=0.3, curvature="diag"),
    "evidence-ggn": lambda: LaplaceEvidenceObjective(curvature="ggn"),
    "evidence-kfac": lambda: LaplaceEvidenceObjective(curvature="kfac"),
    "evidence-full": lambda: LaplaceEvidenceObjective(curvature="full"),
    "predictive-ggn": lambda: LinearizedPredictiveObjective(curvature="ggn"),
    "predictive-kfac": lambda: LinearizedPredictiveObjective(curvature="kfac"),
    "predictive-diag": lambda: LinearizedPredictiveObjective(curvature="diag"),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_gradients_match_central_differences(name: str) -> None:
    batch = regression_batch(T=3, N=4, M=3)
    model = NeuralRegression(tiny_mlp(3), learn_prior_scale=True, prior_scale=0.7)
    guide = TruncatedGradientGuide(model, batch, inner_steps=2, step_size=0.05)
    with torch.no_grad():
        guide.locs.theta_unconstrained.add_(0.3 * torch.randn_like(guide.locs.theta_unconstrained))
    objective = OBJECTIVES[name]()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # the paper's loss warns about the learned prior scale
        loss = objective.differentiable_loss(model, guide, batch)
        params = [guide.locs.theta_unconstrained, guide.locs.noise_scale_unconstrained]
        if not name.startswith(
            "paper"
        ):  # the paper's loss holds a learned prior scale fixed on purpose
            params.append(guide.locs.prior_scale_unconstrained)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        eps = 1e-6
        for param, grad in zip(params, grads, strict=True):
            grad = torch.zeros_like(param) if grad is None else grad
            flat = param.view(-1)
            for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
                with torch.no_grad():
                    flat[i] += eps
                    up = objective.differentiable_loss(model, guide, batch).item()
                    flat[i] -= 2 * eps
                    down = objective.differentiable_loss(model, guide, batch).item()
                    flat[i] += eps
                numeric = (up - down) / (2 * eps)
                assert abs(grad.view(-1)[i].item() - numeric) <= 1e-5 * (1 + abs(numeric)), (
                    name,
                    i,
                    grad.view(-1)[i].item(),
                    numeric,
                )


def test_paper_loss_warns_and_holds_a_learned_prior_precision_fixed() -> None:
    batch = regression_batch(T=3, N=4)
    model = NeuralRegression(tiny_mlp(3), learn_prior_scale=True, prior_scale=0.1)
    guide = TruncatedGradientGuide(model, batch, step_size=0.05)
    objective = LaplacePenaltyObjective(eta=0.5, curvature="ggn")
    with pytest.warns(UserWarning, match="drives it to zero"):
        loss = objective.differentiable_loss(model, guide, batch)
    (grad,) = torch.autograd.grad(loss, guide.locs.prior_scale_unconstrained, allow_unused=True)
    assert grad is None or float(grad.abs()) == 0.0
    # the evidence objective does give it a gradient
    loss = LaplaceEvidenceObjective().differentiable_loss(model, guide, batch)
    (grad,) = torch.autograd.grad(loss, guide.locs.prior_scale_unconstrained)
    assert float(grad.abs()) > 0


def test_fit_llama_returns_laplace_posteriors_and_works_with_svi() -> None:
    source = SinusoidTasks(shots=5, query_shots=5)
    result = fit(
        NeuralRegression(tiny_mlp(8)),
        source,
        method="llama",
        objective="predictive",
        meta_steps=10,
        meta_batch_size=4,
        step_size=0.05,
        progress=False,
    )
    batch = source.sample(3, generator=torch.Generator().manual_seed(0))
    posterior = result.adapt(batch)
    assert isinstance(posterior, LaplacePosterior)
    prediction = result.predict(batch)
    assert prediction.variance.shape == (3, 5, 1)
    assert bool(
        (prediction.variance > result.params["noise_scale"] ** 2).all()
    )  # parameter uncertainty adds
    with pytest.raises(ValueError, match="unknown LLAMA objective 'elbo'"):
        llama_objective(objective="elbo")
    model = NeuralRegression(tiny_mlp(5))
    guide = TruncatedGradientGuide(model, batch, step_size=0.05)
    svi = pyro.infer.SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.02}),
        loss=LinearizedPredictiveObjective(curvature="ggn"),
    )
    losses = [svi.step(batch) for _ in range(30)]
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.parametrize("curvature", ["ggn", "kfac", "diag"])
def test_llama_on_cuda_matches_cpu(curvature: str) -> None:
    source = SinusoidTasks(shots=5, query_shots=5)
    options = dict(
        method="llama",
        objective="predictive",
        curvature=curvature,
        meta_steps=3,
        meta_batch_size=4,
        step_size=0.05,
        progress=False,
        seed=2,
    )
    cpu = fit(NeuralRegression(tiny_mlp(8)), source, **options)  # type: ignore[arg-type]
    gpu = fit(NeuralRegression(tiny_mlp(8)), source, device="cuda", **options)  # type: ignore[arg-type]
    assert_close(torch.tensor(gpu.history), torch.tensor(cpu.history), rtol=1e-6, atol=1e-8)
    batch = source.sample(3, generator=torch.Generator().manual_seed(0))
    prediction = gpu.predict(batch)
    assert prediction.mean.device.type == "cuda"
    assert_close(prediction.variance.cpu(), cpu.predict(batch).variance, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("per_task_noise", [False, True])
def test_one_pass_predictive_equals_the_general_path(per_task_noise: bool) -> None:
    """The predictive objective's one-pass GGN computation (support and query rows in one
    recorded forward pass and one Gram matrix) gives the general path's loss and gradients."""
    batch = regression_batch(T=3, N=5, M=4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, -2:] = False
    from hierbayes.tasks import TaskBatch

    batch = TaskBatch(
        batch.support_x, batch.support_y, batch.query_x, batch.query_y, support_mask=mask
    )
    model = NeuralRegression(
        tiny_mlp(4), per_task_noise=per_task_noise, learn_prior_scale=True, prior_scale=0.5
    )
    guide = TruncatedGradientGuide(model, batch, inner_steps=2, step_size=0.05)
    params = list(guide.parameters())
    fast = LinearizedPredictiveObjective(curvature="ggn")
    general = LinearizedPredictiveObjective(curvature="ggn", jacobian="autograd")
    loss_fast = fast.differentiable_loss(model, guide, batch)
    grads_fast = torch.autograd.grad(loss_fast, params)
    loss_general = general.differentiable_loss(model, guide, batch)
    grads_general = torch.autograd.grad(loss_general, params)
    assert_close(loss_fast, loss_general, **TOL)
    for a, b in zip(grads_fast, grads_general, strict=True):
        assert_close(a, b, **TOL)


def test_predictive_samples_match_the_predictive_moments() -> None:
    sigma, s = 0.5, 0.8
    batch, _model, density, params, X = linear_setup(sigma=sigma, s=s)
    H = X.transpose(1, 2) @ X / sigma**2 + torch.eye(4) / s**2
    mean = torch.linalg.solve(
        H, (X.transpose(1, 2) @ batch.support_y).squeeze(-1) / sigma**2 + params["theta"] / s**2
    )
    posterior = laplace_posterior(density, params, mean, batch.support_x, batch.support_y)
    g = torch.Generator().manual_seed(1)
    for method in ("linearized", "sampled"):
        prediction = posterior.predict(batch.query_x, method=method, num_samples=4000, generator=g)
        draws = prediction.sample(40_000, generator=g)
        assert draws.shape == (40_000, *prediction.mean.shape)
        se = (prediction.variance / 40_000).sqrt()
        assert bool(((draws.mean(0) - prediction.mean).abs() <= 5 * se).all())
        assert_close(draws.var(0), prediction.variance, rtol=0.05, atol=0)
        lower, upper = prediction.interval(0.9)
        inside = ((draws >= lower) & (draws <= upper)).double().mean()
        assert abs(float(inside) - 0.9) < 0.01
