"""LLAMA's default objective, the Laplace predictive, for any model (issue 9, item 2).

A Gaussian network takes the linearised predictive, a network classifier the probit
approximation, any other Pyro program reparameterised draws of phi through its own observation
site. Each is checked against what it approximates: the sampled predictive against the exact
(linearised) one where the model is linear-Gaussian, the probit loss against the plain softmax
when the posterior has no spread and against finite differences, and the sampled loss against
a log-mean-exp computed by hand from the same draws.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from hierbayes.errors import ModelContractError
from hierbayes.inference import fit
from hierbayes.inference.core.laplace import prior_precision
from hierbayes.inference.core.predictive import predictive_losses, probit_log_prob
from hierbayes.inference.curvature import CurvatureInputs, build_curvature
from hierbayes.inference.objectives import LinearizedPredictiveObjective
from hierbayes.models import (
    CategoricalLikelihood,
    GaussianLikelihood,
    PyroTaskDensity,
    TaskDensity,
    TaskModel,
    model_structure,
    task_density,
)
from hierbayes.models.density import capabilities
from hierbayes.tasks import TaskBatch

from .test_any_likelihood import MODELS, simulate


def _classifier_batch(T: int = 4, N: int = 6, M: int = 8, C: int = 3, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N + M, 2, generator=g)
    w = torch.randn(T, 2, C, generator=g)
    y = torch.distributions.Categorical(logits=2 * x @ w).sample()
    return TaskBatch(x[:, :N], y[:, :N], x[:, N:], y[:, N:])


def _classifier(prior_scale: float = 0.7) -> TaskModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3))
    return TaskModel(net, CategoricalLikelihood(), prior_scale=prior_scale)


def _density(model: TaskModel, batch: TaskBatch) -> TaskDensity:
    return task_density(model, model_structure(model, batch.support_x, batch.support_y))


def _predictive(
    density: TaskDensity,
    params: dict[str, Tensor],
    phi: Tensor,
    batch: TaskBatch,
    num_samples: int = 16,
) -> Tensor:
    """The Laplace predictive loss with GGN curvature and the model's own prior precision."""
    return predictive_losses(
        density,
        params,
        phi,
        batch,
        precision=prior_precision(density, params, batch.num_tasks),
        curvature="ggn",
        jacobian="auto",
        capabilities=capabilities(density),
        num_samples=num_samples,
    )


def _losses(model: TaskModel, batch: TaskBatch) -> Tensor:
    params = {"theta": model.theta_init}
    phi = params["theta"].expand(batch.num_tasks, -1).clone()
    return _predictive(_density(model, batch), params, phi, batch)


def test_auto_resolves_by_what_the_model_declares() -> None:
    objective = LinearizedPredictiveObjective()
    assert objective.approximation(_density(_classifier(), _classifier_batch())) == "probit"
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    gaussian = TaskModel(net, GaussianLikelihood(0.3, learned=False))
    x = torch.randn(2, 3, 1)
    objective = LinearizedPredictiveObjective()
    density = task_density(gaussian, model_structure(gaussian, x, torch.randn(2, 3, 1)))
    assert objective.approximation(density) == "linearized"
    batch = simulate(MODELS["bernoulli"])
    structure = model_structure(MODELS["bernoulli"], batch.support_x, batch.support_y)
    objective = LinearizedPredictiveObjective()
    density = PyroTaskDensity(MODELS["bernoulli"], structure, batch.support_x[:1])
    assert objective.approximation(density) == "sampled"
    # an approximation the model cannot take is refused when the objective is bound
    with pytest.raises(ModelContractError, match="predictive='sampled'"):
        LinearizedPredictiveObjective(predictive="linearized").check(
            PyroTaskDensity(MODELS["bernoulli"], structure, batch.support_x[:1])
        )
    with pytest.raises(ValueError, match="predictive must be"):
        LinearizedPredictiveObjective(predictive="laplace")  # type: ignore[arg-type]


def test_probit_is_the_softmax_when_the_posterior_has_no_spread() -> None:
    logits = torch.randn(3, 5, 4)
    labels = torch.randint(0, 4, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert_close(probit_log_prob(logits, torch.zeros_like(logits), labels), expected)
    # spread flattens the class probabilities towards uniform, never sharpens them
    wide = probit_log_prob(logits, torch.full_like(logits, 1e12), labels)
    assert_close(wide, torch.full_like(wide, -math.log(4)), atol=1e-3, rtol=0)


def test_probit_loss_on_a_network_classifier_has_exact_gradients() -> None:
    model = _classifier()
    batch = _classifier_batch()
    density = _density(model, batch)
    theta = model.theta_init.detach().clone().requires_grad_(True)

    def loss(theta: Tensor) -> Tensor:
        params = {"theta": theta}
        phi = theta.expand(batch.num_tasks, -1) + 0.1
        return _predictive(density, params, phi, batch).sum()

    assert torch.autograd.gradcheck(loss, (theta,), eps=1e-6, atol=1e-5)
    # tighter prior: less spread, so the loss moves to the plain softmax NLL at phi
    sharp = _classifier(prior_scale=1e-4)
    params = {"theta": sharp.theta_init}
    phi = params["theta"].expand(batch.num_tasks, -1)
    plain = -_density(sharp, batch).log_likelihood(params, phi, batch.query_x, batch.query_y, None)
    assert_close(_losses(sharp, batch), plain, rtol=1e-4, atol=1e-6)


def _linear_gaussian(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 0.8).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(x[..., 0] * phi[..., 0] + phi[..., 1], 0.3), obs=y)


def test_sampled_predictive_converges_to_the_exact_one_for_a_linear_gaussian_program() -> None:
    """For a model linear in phi with Gaussian noise, the pointwise predictive under the
    (exact) Laplace posterior is N(f, sigma^2 + J H^-1 J^T); many draws reach it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 1, generator=g)
    y = 0.5 + 1.5 * x[..., 0] + 0.3 * torch.randn(3, 12, generator=g)
    batch = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    structure = model_structure(_linear_gaussian, batch.support_x, batch.support_y)
    density = PyroTaskDensity(_linear_gaussian, structure, batch.support_x[:1])
    params = {"theta": torch.tensor([0.2, -0.1])}
    phi = torch.tensor([[1.0, 0.4], [1.2, 0.6], [0.9, 0.5]])
    precision = prior_precision(density, params, 3)
    torch.manual_seed(1)
    sampled = _predictive(density, params, phi, batch, num_samples=100000)
    # exact: posterior N(phi, H^-1) with H = J^T J / s^2 + P, predictive per query point
    inputs = CurvatureInputs(
        density, params, phi, batch.support_x, batch.support_y, None, precision
    )
    cov = build_curvature("ggn", inputs).covariance()
    design = torch.stack([batch.query_x[..., 0], torch.ones_like(batch.query_x[..., 0])], -1)
    mean = (design * phi.unsqueeze(1)).sum(-1)
    var = torch.einsum("tmd,tde,tme->tm", design, cov, design) + 0.3**2
    exact = -torch.distributions.Normal(mean, var.sqrt()).log_prob(batch.query_y).sum(-1)
    # Monte Carlo error at 1e5 draws is about 0.02 nats per task (measured over seeds); without
    # the epistemic term J H^-1 J^T the loss differs by more than 0.3
    assert_close(sampled, exact, rtol=0, atol=0.08)
    plugin = -torch.distributions.Normal(mean, 0.3).log_prob(batch.query_y).sum(-1)
    assert float((plugin - exact).abs().min()) > 0.3


def test_sampled_loss_is_the_log_mean_exp_over_its_draws_and_differentiable() -> None:
    model = MODELS["poisson"]
    batch = simulate(model, T=3, N=6, M=5)
    structure = model_structure(model, batch.support_x, batch.support_y)
    density = PyroTaskDensity(model, structure, batch.support_x[:1])
    theta = torch.tensor([1.0, -0.5, 0.3], requires_grad=True)
    params = {"theta": theta}
    phi = theta.expand(3, 3) * 0.9
    precision = prior_precision(density, params, 3)
    S = 7
    torch.manual_seed(5)
    loss = _predictive(density, params, phi, batch, num_samples=S)
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # the same draws by hand: the same generator state, the same curvature
    inputs = CurvatureInputs(
        density, params, phi, batch.support_x, batch.support_y, None, precision
    )
    torch.manual_seed(5)
    draws = phi + build_curvature("ggn", inputs).sample(S)  # (S, T, D)
    f = (batch.query_x.unsqueeze(0) * draws[..., None, :2]).sum(-1) + draws[..., None, 2]
    lp = torch.distributions.Poisson(torch.exp(0.5 * f)).log_prob(batch.query_y)  # (S, T, M)
    by_hand = -(torch.logsumexp(lp, 0) - math.log(S)).sum(-1)
    assert_close(loss, by_hand)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_llama_defaults_train_plain_programs(family: str) -> None:
    """repro_04's refusal, fixed: method='llama' with every default on a plain Pyro program."""
    model = MODELS[family]
    batch = simulate(model)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = fit(
            model, batch, method="llama", meta_steps=40, meta_batch_size=8, lr=2e-2,
            step_size=0.05, progress=False,
        )  # fmt: skip
    losses = torch.tensor(result.history)
    assert bool(torch.isfinite(losses).all())
    assert float(losses[-10:].mean()) < float(losses[:10].mean())


def test_llama_defaults_train_a_network_classifier() -> None:
    """The README's TaskModel(net, CategoricalLikelihood()) under method='llama' defaults."""
    model = _classifier()
    batch = _classifier_batch(T=8)
    torch.manual_seed(0)
    result = fit(
        model, batch, method="llama", meta_steps=60, meta_batch_size=8, lr=2e-2,
        step_size=0.2, progress=False,
    )  # fmt: skip
    losses = torch.tensor(result.history)
    assert bool(torch.isfinite(losses).all())
    assert float(losses[-10:].mean()) < float(losses[:10].mean())
    posterior = result.adapt(batch)
    probs = posterior.predict(batch.query_x).mean
    assert_close(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=probs.dtype))
