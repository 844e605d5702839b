"""MAML meta-gradients against an independent loop-over-tasks reference and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro import poutine
from torch.testing import assert_close

from hierbayes.inference import MAMLObjective, TruncatedGradientGuide
from hierbayes.models import GaussianLikelihood, TaskModel
from hierbayes.models.density import PyroTaskDensity
from tests.helpers import regression_batch, tiny_mlp

TOL = dict(atol=1e-8, rtol=1e-8)


def reference_forward(phi: torch.Tensor, x: torch.Tensor, hidden: int) -> torch.Tensor:
    """The 1-h-1 tanh network written out by hand (row-major weight, then bias)."""
    w1 = phi[:hidden].reshape(hidden, 1)
    b1 = phi[hidden : 2 * hidden]
    w2 = phi[2 * hidden : 3 * hidden].reshape(1, hidden)
    b2 = phi[3 * hidden :]
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def reference_loglik(phi, x, y, sigma, hidden):  # type: ignore[no-untyped-def]
    f = reference_forward(phi, x, hidden)
    return (-0.5 * ((y - f) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum()


def reference_maml_loss(theta, sigma, alpha, batch, *, steps, first_order, hidden):  # type: ignore[no-untyped-def]
    """MAML, one task at a time, in plain torch (Finn et al. 2017, Algorithm 2)."""
    total = 0.0
    T = batch.num_tasks
    for j in range(T):
        phi = theta
        for _ in range(steps):
            ll = reference_loglik(phi, batch.support_x[j], batch.support_y[j], sigma, hidden)
            (g,) = torch.autograd.grad(ll, phi, create_graph=not first_order)
            if first_order:
                g = g.detach()
            phi = phi + alpha * g
        total = total - reference_loglik(phi, batch.query_x[j], batch.query_y[j], sigma, hidden)
    return total / T


def build(
    hidden: int, steps: int, first_order: bool, learn_step_size: str = "fixed", alpha: float = 0.05
):  # type: ignore[no-untyped-def]
    batch = regression_batch(T=4, N=6, M=5)
    model = TaskModel(
        tiny_mlp(hidden), GaussianLikelihood(0.7, learned=True), hyperprior_scale=10.0
    )
    guide = TruncatedGradientGuide(
        model,
        batch,
        inner_steps=steps,
        step_size=alpha,
        first_order=first_order,
        learn_step_size=learn_step_size,  # type: ignore[arg-type]
    )
    # Move away from the initial point so every term has a non-trivial gradient.
    with torch.no_grad():
        guide.locs.theta_unconstrained.add_(0.1 * torch.randn_like(guide.locs.theta_unconstrained))
    return batch, model, guide


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_loop_over_tasks(steps: int, first_order: bool) -> None:
    hidden, alpha = 5, 0.05
    batch, model, guide = build(hidden, steps, first_order, alpha=alpha)
    loss = MAMLObjective().differentiable_loss(model, guide, batch)
    loss.backward()

    theta = guide.locs.theta.detach().clone().requires_grad_(True)
    log_sigma = guide.locs.noise_scale_unconstrained.detach().clone().requires_grad_(True)
    ref = reference_maml_loss(
        theta, log_sigma.exp(), alpha, batch, steps=steps, first_order=first_order, hidden=hidden
    )
    ref.backward()

    assert_close(loss.detach(), ref.detach(), **TOL)
    assert_close(guide.locs.theta_unconstrained.grad, theta.grad, **TOL)
    assert_close(guide.locs.noise_scale_unconstrained.grad, log_sigma.grad, **TOL)
    # the two orders share the loss but not the gradient: the test can tell them apart
    t2 = theta.detach().clone().requires_grad_(True)
    reference_maml_loss(
        t2,
        log_sigma.exp().detach(),
        alpha,
        batch,
        steps=steps,
        first_order=not first_order,
        hidden=hidden,
    ).backward()
    assert (t2.grad - theta.grad).abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["scalar", "per_parameter"])
def test_learned_step_size_gradients(mode: str) -> None:
    hidden, alpha, steps = 4, 0.03, 2
    batch, model, guide = build(hidden, steps, False, learn_step_size=mode, alpha=alpha)
    with torch.no_grad():  # make per-parameter steps differ
        guide.step_size_param_unconstrained.add_(
            0.2 * torch.randn_like(guide.step_size_param_unconstrained)
        )
    loss = MAMLObjective().differentiable_loss(model, guide, batch)
    loss.backward()

    theta = guide.locs.theta.detach().clone().requires_grad_(True)
    step = guide.step_size.detach().clone().requires_grad_(True)
    sigma = guide.locs.noise_scale.detach()
    ref = reference_maml_loss(
        theta, sigma, step, batch, steps=steps, first_order=False, hidden=hidden
    )
    ref.backward()
    assert_close(guide.locs.theta_unconstrained.grad, theta.grad, **TOL)
    # the guide stores log(alpha): dL/dlog(alpha) = alpha * dL/dalpha
    assert_close(guide.step_size_param_unconstrained.grad, step.detach() * step.grad, **TOL)


def test_meta_gradient_matches_central_differences() -> None:
    hidden = 3
    batch, model, guide = build(hidden, 2, False)
    objective = MAMLObjective()
    loss = objective.differentiable_loss(model, guide, batch)
    loss.backward()
    grad = guide.locs.theta_unconstrained.grad.clone()
    eps = 1e-6
    numeric = torch.zeros_like(grad)
    param = guide.locs.theta_unconstrained
    for i in range(param.numel()):
        with torch.no_grad():
            param[i] += eps
            up = objective.differentiable_loss(model, guide, batch).item()
            param[i] -= 2 * eps
            down = objective.differentiable_loss(model, guide, batch).item()
            param[i] += eps
        numeric[i] = (up - down) / (2 * eps)
    assert_close(grad, numeric, atol=1e-7, rtol=1e-6)


def test_hyperprior_enters_with_weight_one_over_num_tasks() -> None:
    batch, model, guide = build(3, 1, False)
    base = MAMLObjective().differentiable_loss(model, guide, batch)
    J = 7
    with_prior = MAMLObjective(num_tasks=J).differentiable_loss(model, guide, batch)
    params = guide.global_values()
    log_hyper = guide.density.log_hyperprior(params, batch.support_x)
    assert_close(with_prior - base, -log_hyper / J, **TOL)


def test_traced_pyro_path_equals_fast_path() -> None:
    """Inside a Pyro handler the guide runs as a traced Pyro program; the result is identical."""
    batch, model, guide = build(4, 2, False)
    objective = MAMLObjective(num_tasks=10)
    fast = objective.differentiable_loss(model, guide, batch)
    fast.backward()
    g_fast = guide.locs.theta_unconstrained.grad.clone()
    guide.zero_grad()
    with poutine.trace(param_only=True) as capture:
        traced = objective.differentiable_loss(model, guide, batch)
    traced.backward()
    assert_close(traced, fast, **TOL)
    assert_close(guide.locs.theta_unconstrained.grad, g_fast, **TOL)
    # the traced run exposed the guide's parameters to the handler
    assert any("locs.theta" in name for name in capture.trace.nodes)


def test_generic_pyro_density_gives_the_same_meta_gradient() -> None:
    batch, model, guide = build(4, 2, False)
    objective = MAMLObjective()
    objective.differentiable_loss(model, guide, batch).backward()
    g_native = guide.locs.theta_unconstrained.grad.clone()
    guide.zero_grad()
    guide.density = PyroTaskDensity(model, guide.structure)
    objective.differentiable_loss(model, guide, batch).backward()
    assert_close(guide.locs.theta_unconstrained.grad, g_native, **TOL)


@given(seed=st.integers(0, 2**16), steps=st.integers(0, 3))
def test_permuting_tasks_permutes_nothing_else(seed: int, steps: int) -> None:
    torch.set_default_dtype(torch.float64)
    batch, model, guide = build(4, steps, False)
    objective = MAMLObjective()
    loss = objective.differentiable_loss(model, guide, batch)
    (grad,) = torch.autograd.grad(loss, guide.locs.theta_unconstrained)
    perm = torch.randperm(batch.num_tasks, generator=torch.Generator().manual_seed(seed))
    permuted = batch.select(perm)
    loss_p = objective.differentiable_loss(model, guide, permuted)
    (grad_p,) = torch.autograd.grad(loss_p, guide.locs.theta_unconstrained)
    assert_close(loss_p, loss, **TOL)
    assert_close(grad_p, grad, **TOL)
    with torch.no_grad():
        params = guide.global_values()
        phi = guide.adapt(params, batch.support_x, batch.support_y)
        phi_p = guide.adapt(params, permuted.support_x, permuted.support_y)
    assert_close(phi_p, phi[perm], **TOL)
