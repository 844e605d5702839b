"""The JAX log density of a TaskModel against the torch TaskModelDensity (float64, 1e-10)."""

from __future__ import annotations

import sys
import typing

import numpy as np
import pytest
import torch
from torch import nn

from hierbayes.models import (
    BayesianLinearRegression,
    CategoricalLikelihood,
    GaussianLikelihood,
    NeuralRegression,
    TaskModel,
    model_structure,
)

jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

from hierbayes.inference.references.jax_density import (  # noqa: E402
    jax_log_density,
    jax_params,
    likelihood_spec,
)
from hierbayes.inference.references.jax_network import (  # noqa: E402
    _JAX_STEPS,
    jax_network,
    require_jax,
)
from hierbayes.models.likelihoods import LikelihoodSpec  # noqa: E402
from hierbayes.models.network_plan import PlanStep  # noqa: E402

TOL = dict(atol=1e-10, rtol=1e-10)


def torch_log_joint(model: TaskModel, params, phi, x, y, mask=None):  # type: ignore[no-untyped-def]
    density = model.task_density(model_structure(model, x, y))
    return density.log_likelihood(params, phi, x, y, mask) + density.log_prior(params, phi, x)


def jax_log_joint(model: TaskModel, params, phi, x, y, mask=None):  # type: ignore[no-untyped-def]
    with jax.enable_x64(True):
        f = jax_log_density(model)
        jp = jax_params(model, params)
        args = [phi.numpy(), x.numpy(), y.numpy()]
        if mask is None:
            out = jax.vmap(lambda p, xx, yy: f(p, xx, yy, jp))(*args)
        else:
            out = jax.vmap(lambda p, xx, yy, m: f(p, xx, yy, jp, m))(*args, mask.numpy())
        return torch.tensor(np.array(out))


def random_regression(model: TaskModel, T: int, N: int, d: int, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, d, generator=g)
    y = 2 * torch.randn(T, N, 1, generator=g)
    phi = model.theta_init + 0.5 * torch.randn(T, model.num_params, generator=g)
    params = {k: v for k, v in model.initial_values().items()}
    if "theta" in params:
        params["theta"] = params["theta"] + 0.3 * torch.randn(model.num_params, generator=g)
    if "noise_scale" in params:
        params["noise_scale"] = torch.tensor(0.37)
    return params, phi, x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_regression_matches_torch(seed: int) -> None:
    model = BayesianLinearRegression(3, bias=True, noise_scale=0.6, learn_noise=True)
    params, phi, x, y = random_regression(model, T=4, N=7, d=3, seed=seed)
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y), torch_log_joint(model, params, phi, x, y), **TOL
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_sinusoid_network_matches_torch(seed: int) -> None:
    torch.manual_seed(seed)
    model = NeuralRegression()  # 1-40-40-1 ReLU, D = 1761, learned noise
    params, phi, x, y = random_regression(model, T=3, N=10, d=1, seed=seed)
    expected = torch_log_joint(model, params, phi, x, y)
    torch.testing.assert_close(jax_log_joint(model, params, phi, x, y), expected, **TOL)


def test_categorical_mlp_with_learned_prior_scale_matches_torch() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = TaskModel(net, CategoricalLikelihood(), prior_scale=0.8, learn_prior_scale=True)
    g = torch.Generator().manual_seed(3)
    T, N = 3, 9
    x = torch.randn(T, N, 2, generator=g)
    y = torch.randint(0, 3, (T, N), generator=g)
    phi = model.theta_init + torch.randn(T, model.num_params, generator=g)
    params = dict(model.initial_values())
    params["prior_scale"] = torch.tensor(0.65)
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y), torch_log_joint(model, params, phi, x, y), **TOL
    )


ACTIVATIONS = [
    nn.Sigmoid(),
    nn.ELU(alpha=0.7),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.Softplus(beta=2.0, threshold=3.0),
    nn.LeakyReLU(0.1),
    nn.Identity(),
]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda m: repr(m))
def test_every_activation_matches_torch(activation: nn.Module) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(2, 6), activation), nn.Linear(6, 1))
    model = TaskModel(net, GaussianLikelihood(0.5, learned=False))
    params, phi, x, y = random_regression(model, T=2, N=5, d=2, seed=1)
    phi = 3 * phi  # reach the saturated and thresholded regions too
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y), torch_log_joint(model, params, phi, x, y), **TOL
    )


def test_mask_drops_points_like_torch() -> None:
    model = BayesianLinearRegression(2, bias=True, noise_scale=0.5)
    params, phi, x, y = random_regression(model, T=3, N=6, d=2, seed=4)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1] = False
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y, mask),
        torch_log_joint(model, params, phi, x, y, mask),
        **TOL,
    )


def test_gradient_matches_torch_autograd() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))
    model = TaskModel(net, GaussianLikelihood(0.7, learned=True))
    params, phi, x, y = random_regression(model, T=1, N=6, d=1, seed=5)
    phi_t = phi.clone().requires_grad_(True)
    (torch_grad,) = torch.autograd.grad(torch_log_joint(model, params, phi_t, x, y).sum(), phi_t)
    with jax.enable_x64(True):
        f = jax_log_density(model)
        jp = jax_params(model, params)
        g = jax.grad(lambda p: f(p, x[0].numpy(), y[0].numpy(), jp))(phi[0].numpy())
    torch.testing.assert_close(torch.tensor(np.array(g)), torch_grad[0], **TOL)


def test_network_matches_batched_network() -> None:
    torch.manual_seed(2)
    model = NeuralRegression()
    g = torch.Generator().manual_seed(0)
    phi = model.theta_init + 0.1 * torch.randn(1, model.num_params, generator=g)
    x = torch.randn(1, 8, 1, generator=g)
    with jax.enable_x64(True):
        out = jax_network(model)(phi[0].numpy(), x[0].numpy())
    torch.testing.assert_close(torch.tensor(np.array(out)), model.net(phi, x)[0], **TOL)


def test_network_off_the_fast_path_points_to_nuts_pyro() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.lin(x)

    model = TaskModel(Residual(), GaussianLikelihood())
    assert model.net.plan is None
    with pytest.raises(NotImplementedError, match=r"fast path.*Residual.*nuts_pyro"):
        jax_log_density(model)


def test_likelihood_without_a_description_points_to_nuts_pyro() -> None:
    class Student(GaussianLikelihood):  # changes the density, so drops the spec
        @property
        def spec(self) -> None:  # type: ignore[override]
            return None

    model = TaskModel(nn.Linear(1, 1), Student())
    with pytest.raises(NotImplementedError, match=r"declares no LikelihoodSpec.*nuts_pyro"):
        jax_log_density(model)


def test_likelihood_specs_declare_kind_and_noise() -> None:
    assert likelihood_spec(GaussianLikelihood(0.3, learned=False)) == LikelihoodSpec(
        "gaussian", "fixed", 0.3
    )
    assert likelihood_spec(GaussianLikelihood()).noise == "learned"
    assert likelihood_spec(GaussianLikelihood(per_task=True)).noise == "per_task"
    assert likelihood_spec(CategoricalLikelihood()) == LikelihoodSpec("categorical")


def test_every_plan_step_kind_has_a_jax_implementation() -> None:
    kinds = {cls.kind for cls in typing.get_args(PlanStep)}
    assert kinds == set(_JAX_STEPS)


def with_head(*features: nn.Module) -> nn.Sequential:
    """``features``, Flatten and a Linear layer to 3 outputs, sized for ``(2, 7, 6)`` inputs."""
    body = nn.Sequential(*features, nn.Flatten())
    size = body(torch.zeros(2, 2, 7, 6)).shape[-1]  # batch of 2: batch norm needs > 1 point
    return nn.Sequential(*features, nn.Flatten(), nn.Linear(size, 3))


CONV_NETWORKS = {
    "conv-bn-maxpool": lambda: with_head(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 2, bias=False),
        nn.Sigmoid(),
    ),
    "strided-dilated-avgpool": lambda: with_head(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.Tanh(),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    ),
    "pool-options": lambda: with_head(
        nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(2, 2, 1),
        nn.AvgPool2d(2, padding=1, divisor_override=3),
        nn.BatchNorm2d(2, affine=False),
    ),
}


@pytest.mark.parametrize("name", list(CONV_NETWORKS))
def test_convolutional_plan_matches_torch(name: str) -> None:
    """Convolution, pooling (every torch option), batch norm and flatten, step by step."""
    torch.manual_seed(0)
    model = TaskModel(CONV_NETWORKS[name](), CategoricalLikelihood(), prior_scale=0.7)
    assert {step.kind for step in model.net.plan or ()} >= {"conv2d", "pool", "flatten"}
    g = torch.Generator().manual_seed(1)
    T, N = 2, 5
    x = torch.randn(T, N, 2, 7, 6, generator=g)
    y = torch.randint(0, 3, (T, N), generator=g)
    phi = model.theta_init + 0.3 * torch.randn(T, model.num_params, generator=g)
    params = dict(model.initial_values())
    with jax.enable_x64(True):
        f = jax.vmap(jax_network(model))(phi.numpy(), x.numpy())
    torch.testing.assert_close(torch.tensor(np.array(f)), model.net(phi, x), **TOL)
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y), torch_log_joint(model, params, phi, x, y), **TOL
    )


def test_batch_norm_with_a_mask_uses_the_real_points_only() -> None:
    """A padded task's density equals the torch density of the task without its padding."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1))
    model = TaskModel(net, GaussianLikelihood(0.5))
    params, phi, x, y = random_regression(model, T=1, N=7, d=2, seed=8)
    mask = torch.tensor([[True, True, False, True, True, False, True]])
    real = mask[0]
    expected = torch_log_joint(model, params, phi, x[:, real], y[:, real])
    torch.testing.assert_close(jax_log_joint(model, params, phi, x, y, mask), expected, **TOL)
    # all points real: the torch density on the padded layout itself
    full = torch.ones_like(mask)
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y, full),
        torch_log_joint(model, params, phi, x, y, full),
        **TOL,
    )


def test_missing_jax_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(ImportError, match=r'pip install "hierbayes\[jax\]"'):
        require_jax()


def test_per_task_noise_scale_matches_torch() -> None:
    """log sigma_j is the last entry of phi_j, with its own prior scale."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 1))
    model = TaskModel(net, GaussianLikelihood(0.8, per_task=True, per_task_prior_scale=0.3))
    assert model.num_params == model.net.num_params + 1
    params, phi, x, y = random_regression(model, T=3, N=6, d=1, seed=6)
    torch.testing.assert_close(
        jax_log_joint(model, params, phi, x, y), torch_log_joint(model, params, phi, x, y), **TOL
    )
