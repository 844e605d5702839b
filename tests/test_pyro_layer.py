"""The Pyro layer honours Pyro's handlers: SVI trains every learnable tensor, ``poutine.scale``,
``mask`` and ``condition`` act on the losses, and the fast road of ``fit`` equals the Pyro road."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference import (
    MAMLObjective,
    Method,
    TruncatedGradientGuide,
    fit,
    llama_objective,
    methods,
    register_method,
)
from hierbayes.models import BayesianLinearRegression, NeuralRegression
from hierbayes.tasks import TaskBatch
from tests.helpers import regression_batch, tiny_mlp

TOL = dict(rtol=1e-9, atol=1e-10)


def param_regression(x: Tensor, y: Tensor | None = None) -> None:
    """Plain Pyro program whose theta is a ``pyro.param`` (plain empirical Bayes)."""
    theta = pyro.param("theta", torch.zeros(2))
    T, N = x.shape[0], x.shape[1]
    with pyro.plate("tasks", T, dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))  # (T, 1, 2)
        mean = phi[..., :1] * x[..., 0] + phi[..., 1:]  # (T, N)
        with pyro.plate("data", N, dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def logistic(x: Tensor, y: Tensor | None = None) -> None:
    """Hierarchical logistic regression: a global latent and a Bernoulli likelihood."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    T, N = x.shape[0], x.shape[1]
    with pyro.plate("tasks", T, dim=-2):
        w = pyro.sample("w", dist.Normal(mu, 1.0).to_event(1))  # (T, 1, 2)
        logits = w[..., 0] * x[..., 0] + w[..., 1]  # (T, N)
        with pyro.plate("data", N, dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def logistic_batch(T: int = 5, N: int = 8, M: int = 6, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.5, -0.5]) + torch.randn(T, 2, generator=g)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(T, n, 1, generator=g)
        p = torch.sigmoid(w[:, :1, None].squeeze(-1) * x[..., 0] + w[:, 1:])
        return x, torch.bernoulli(p, generator=g)

    xs, ys = draw(N)
    xq, yq = draw(M)
    return TaskBatch(xs, ys, xq, yq)


def linear_batch(T: int = 6, N: int = 5, M: int = 4, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([2.0, -1.0]) + 0.3 * torch.randn(T, 2, generator=g)
    xs, xq = torch.randn(T, N, 1, generator=g), torch.randn(T, M, 1, generator=g)
    ys = w[:, None, :1] * xs + w[:, None, 1:] + 0.5 * torch.randn(T, N, 1, generator=g)
    yq = w[:, None, :1] * xq + w[:, None, 1:] + 0.5 * torch.randn(T, M, 1, generator=g)
    return TaskBatch(xs, ys, xq, yq)


def run_svi(
    model: object, guide: TruncatedGradientGuide, batch: TaskBatch, steps: int
) -> list[float]:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=MAMLObjective())
    return [svi.step(batch) for _ in range(steps)]


def test_svi_trains_a_function_models_pyro_param() -> None:
    batch = linear_batch()
    guide = TruncatedGradientGuide(param_regression, batch, inner_steps=1, step_size=0.05)
    losses = run_svi(param_regression, guide, batch, 30)
    theta = pyro.param("theta").detach()
    assert losses[-1] < losses[0] - 0.5, losses
    assert float(theta.abs().sum()) > 0.5  # it moved from zero towards (2, -1)
    assert theta[0] > 0 and theta[1] < 0


def test_svi_trains_a_pyro_module_models_pyro_param() -> None:
    batch = regression_batch(T=6)
    model = BayesianLinearRegression(1, noise_scale=0.5, hyperprior_scale=None)
    guide = TruncatedGradientGuide(model, batch, inner_steps=1, step_size=0.05)
    before = model.theta.detach().clone()
    losses = run_svi(model, guide, batch, 20)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.theta.detach(), before)


def test_svi_trains_learned_step_sizes() -> None:
    batch = regression_batch()
    model = NeuralRegression(tiny_mlp(4))
    guide = TruncatedGradientGuide(model, batch, step_size=0.01, learn_step_size="per_parameter")
    before = guide.step_size.detach().clone()
    run_svi(model, guide, batch, 5)
    assert not torch.equal(guide.step_size.detach(), before)


@pytest.mark.parametrize("objective", ["maml", "predictive", "evidence", "paper"])
def test_poutine_scale_scales_every_loss(objective: str) -> None:
    batch = regression_batch()
    model = NeuralRegression(tiny_mlp(4))
    guide = TruncatedGradientGuide(model, batch, inner_steps=1, step_size=0.05)
    loss = MAMLObjective(num_tasks=10) if objective == "maml" else llama_objective(10, objective)
    plain = loss.differentiable_loss(model, guide, batch)
    with poutine.scale(scale=0.5):
        scaled = loss.differentiable_loss(model, guide, batch)
    assert_close(scaled, 0.5 * plain, **TOL)
    with poutine.mask(mask=False):
        masked = loss.differentiable_loss(model, guide, batch)
    assert_close(masked, torch.zeros(()), **TOL)


def test_poutine_scale_and_svi_take_the_sampled_predictive_of_a_plain_program() -> None:
    """LLAMA's default objective on a Bernoulli program (draws of phi through its own site)
    under Pyro's handlers and SVI, as every other objective."""
    batch = logistic_batch()
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=1, step_size=0.1)
    loss = llama_objective(10, "predictive", num_samples=8)
    torch.manual_seed(1)
    plain = loss.differentiable_loss(logistic, guide, batch)
    torch.manual_seed(1)
    with poutine.scale(scale=0.5):
        scaled = loss.differentiable_loss(logistic, guide, batch)
    assert_close(scaled, 0.5 * plain, **TOL)
    assert loss.approximation(guide.density) == "sampled"  # type: ignore[attr-defined]
    svi = SVI(logistic, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    before = {k: v.detach().clone() for k, v in guide.global_values().items()}
    values = [svi.step(batch) for _ in range(5)]
    assert all(math.isfinite(v) for v in values)
    assert not torch.equal(guide.global_values()["mu"].detach(), before["mu"])


def test_poutine_condition_conditions_the_scored_model() -> None:
    batch = regression_batch()
    model = NeuralRegression(tiny_mlp(4))
    guide = TruncatedGradientGuide(model, batch, inner_steps=1, step_size=0.05)
    sigma = torch.tensor(0.3)
    conditioned = poutine.condition(model, data={"noise_scale": sigma})
    loss = MAMLObjective().differentiable_loss(conditioned, guide, batch)
    params = guide.global_values()
    phi = guide.adapt(params, batch.support_x, batch.support_y)
    expected = -guide.density.log_likelihood(
        {**params, "noise_scale": sigma}, phi, batch.query_x, batch.query_y
    ).mean()
    assert_close(loss, expected, **TOL)


@pytest.mark.parametrize(
    "case",
    [
        "maml-network",
        "predictive-network",
        "paper-network",
        "maml-logistic",
        "evidence-logistic",
        "predictive-logistic",
    ],
)
def test_the_fast_road_equals_the_pyro_road(case: str) -> None:
    """What ``fit`` computes (``meta_loss``) equals what ``SVI`` computes, value and gradients."""
    objective_name, which = case.split("-")
    if which == "network":
        batch = regression_batch()
        model: object = NeuralRegression(tiny_mlp(4))
    else:
        batch = logistic_batch()
        model = logistic
    guide = TruncatedGradientGuide(model, batch, inner_steps=2, step_size=0.1)  # type: ignore[arg-type]
    if objective_name == "maml":
        objective = MAMLObjective(num_tasks=20)
    else:
        options = {} if which == "network" else {"curvature": "full"}
        objective = llama_objective(20, objective_name, **options)
    params = [p for p in guide.parameters() if p.requires_grad]
    torch.manual_seed(0)  # the sampled predictive of a plain program draws: the same draws
    fast = objective.meta_loss(guide, batch)
    g_fast = torch.autograd.grad(fast, params)
    torch.manual_seed(0)
    pyro_road = objective.differentiable_loss(model, guide, batch)  # type: ignore[arg-type]
    g_pyro = torch.autograd.grad(pyro_road, params)
    assert_close(pyro_road, fast, **TOL)
    for a, b in zip(g_pyro, g_fast, strict=True):
        assert_close(a, b, **TOL)


def test_a_users_trace_of_the_guide_sees_the_guides_sites_only() -> None:
    batch = logistic_batch()
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=2, step_size=0.1)
    trace = poutine.trace(guide).get_trace(batch.support_x, batch.support_y)
    samples = [
        n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    ]
    assert samples == ["mu", "w"]  # the inner loop's evaluations of the model stay hidden
    params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
    assert any(n.endswith("locs.mu") for n in params)


def test_adapt_overrides_do_not_mutate_the_guide() -> None:
    batch = regression_batch()
    model = NeuralRegression(tiny_mlp(4))
    result = fit(model, batch, meta_steps=3, inner_steps=1, step_size=0.05, progress=False)
    guide = result.guide
    before = (guide.inner_steps, guide.step_size.clone())
    zero = result.adapt(batch, inner_steps=0).mean
    three = result.adapt(batch, inner_steps=3, step_size=0.1).mean
    assert (guide.inner_steps, guide.step_size) == (before[0], before[1])
    assert_close(zero, result.theta.expand_as(zero))
    assert not torch.allclose(three, zero)
    again = result.adapt(batch).mean
    params = guide.global_values()
    expected = guide.adapt(params, batch.support_x, batch.support_y)
    assert_close(again, expected.detach())


def test_register_method_refuses_a_duplicate_name() -> None:
    existing = methods()["maml"]
    with pytest.raises(ValueError, match="registered already"):
        register_method(existing)
    register_method(Method("maml", existing.objective, existing.description), overwrite=True)
    assert methods()["maml"].name == "maml"


def test_objectives_refuse_missing_capabilities_before_training() -> None:
    from hierbayes.errors import ModelContractError

    batch = logistic_batch()
    with pytest.raises(ModelContractError, match="curvature='kfac'"):
        fit(
            logistic,
            batch,
            method="llama",
            objective="evidence",
            curvature="kfac",
            meta_steps=1,
            progress=False,
        )


def test_evaluating_a_plain_programs_density_leaves_the_random_stream_alone() -> None:
    """Without targets the program draws its observations; those draws are internal."""
    batch = logistic_batch()
    guide = TruncatedGradientGuide(logistic, batch, inner_steps=1, step_size=0.1)
    params = guide.global_values()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    guide.density.prior_mean(params, batch.support_x)
    guide.density.log_hyperprior(params, batch.support_x)
    guide.density.predictive(params, guide.density.prior_mean(params, batch.query_x), batch.query_x)
    assert torch.equal(torch.rand(3), expected)
