"""GGN and diagonal curvature of plain Pyro programs from their observation sites.

Checked against the network fast path (both apply to a TaskModel), the exact Hessian (linear
models with canonical links, where the two coincide), closed-form Fisher informations (by
enumeration or quadrature), the Monte Carlo Fisher's known expectation, and finite differences
of the log determinant in theta.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature import CurvatureInputs, DiagonalCurvature, build_curvature
from hierbayes.inference.curvature.observation import exact_fisher, observation_jacobian
from hierbayes.models import (
    CategoricalLikelihood,
    NeuralRegression,
    PyroTaskDensity,
    TaskModel,
    model_structure,
    task_density,
)
from tests.helpers import regression_batch, tiny_mlp

EXACT = dict(atol=1e-10, rtol=1e-10)


def program(family: str, D: int = 3) -> Callable[..., Any]:
    """``model(x, y=None)``: theta global, phi in the tasks plate (dim -2), linear predictor
    ``x·phi[:-1] + phi[-1]`` into the ``family``'s observation site in a data plate."""

    def model(x: Tensor, y: Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(torch.zeros(D), 5.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            f = (x * phi[..., : D - 1]).sum(-1) + phi[..., D - 1]
            with pyro.plate("data", x.shape[1], dim=-1):
                if family == "normal":
                    fn: Any = dist.Normal(f, 0.7)
                elif family == "hetero":  # log scale linear in phi too
                    fn = dist.Normal(f, torch.exp(0.5 * x[..., 0] * phi[..., 0] - 0.3))
                elif family == "bernoulli":
                    fn = dist.Bernoulli(logits=f)
                elif family == "bernoulli_probs":
                    fn = dist.Bernoulli(probs=torch.sigmoid(f))
                elif family == "poisson":
                    fn = dist.Poisson(torch.exp(0.3 * f))
                elif family == "studentt":
                    fn = dist.StudentT(4.0, f, 0.8)
                elif family == "weibull":  # no exact Fisher: Monte Carlo
                    # Weibull(scale = exp(-0.4 f), concentration 1) is Exponential(exp(0.4 f))
                    fn = dist.Weibull(torch.exp(-0.4 * f), torch.ones(()))
                else:
                    raise ValueError(family)
                pyro.sample("y", fn, obs=y)

    return model


def program_inputs(
    family: str,
    T: int = 3,
    N: int = 6,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
    seed: int = 0,
) -> CurvatureInputs:
    g = torch.Generator().manual_seed(seed)
    model = program(family)
    x = torch.randn(T, N, 2, generator=g)
    with pyro.poutine.seed(rng_seed=seed):
        y = pyro.poutine.trace(model).get_trace(x).nodes["y"]["value"].detach()
    structure = model_structure(model, x, y)
    density = PyroTaskDensity(model, structure)
    phi = 0.5 * torch.randn(T, 3, generator=g)
    params = {"theta": torch.zeros(3)}
    P = torch.full((3,), 1.0)
    return CurvatureInputs(density, params, phi, x, y, mask, P, create_graph)


def hessian(inputs: CurvatureInputs) -> Tensor:
    return build_curvature("full", inputs).to_dense()


# -- both paths agree on a TaskModel ------------------------------------------------------------


def _network_and_program(inputs: CurvatureInputs) -> CurvatureInputs:
    native = inputs.density
    generic = PyroTaskDensity(native.model, native.structure)  # type: ignore[attr-defined]
    return CurvatureInputs(
        generic, inputs.params, inputs.phi, inputs.x, inputs.y, inputs.mask, inputs.prior_precision
    )


def gaussian_network_inputs(mask: bool) -> CurvatureInputs:
    batch = regression_batch(T=3, N=5)
    model = NeuralRegression(tiny_mlp(4))
    structure = model_structure(model, batch.support_x, batch.support_y)
    phi = model.theta_init + 0.3 * torch.randn(3, structure.num_params)
    m = None
    if mask:
        m = torch.ones(3, 5, dtype=torch.bool)
        m[0, -2:] = False
        m[2, 1] = False
    return CurvatureInputs(
        task_density(model, structure),
        {"theta": model.theta_init, "noise_scale": torch.tensor(0.6)},
        phi,
        batch.support_x,
        batch.support_y,
        m,
        torch.full((structure.num_params,), 2.0),
        False,
    )


def categorical_network_inputs() -> CurvatureInputs:
    torch.manual_seed(1)
    model = TaskModel(
        nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)), CategoricalLikelihood()
    )
    x, y = torch.randn(2, 4, 2), torch.randint(0, 3, (2, 4))
    structure = model_structure(model, x, y)
    phi = model.theta_init + 0.5 * torch.randn(2, structure.num_params)
    P = torch.full((structure.num_params,), 1.5)
    return CurvatureInputs(
        task_density(model, structure), {"theta": model.theta_init}, phi, x, y, None, P, False
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: gaussian_network_inputs(False),
        lambda: gaussian_network_inputs(True),
        categorical_network_inputs,
    ],
    ids=["gaussian", "gaussian-masked", "categorical"],
)
@pytest.mark.parametrize("curvature", ["ggn", "diag"])
def test_observation_path_equals_the_network_fast_path(
    make: Callable[[], CurvatureInputs], curvature: str
) -> None:
    network = make()
    generic = _network_and_program(network)
    generic.create_graph = False
    fast = build_curvature(curvature, network)
    observed = build_curvature(curvature, generic)
    assert_close(observed.to_dense(), fast.to_dense(), **EXACT)
    assert_close(observed.logdet(), fast.logdet(), **EXACT)


# -- canonical links: GGN = exact Hessian --------------------------------------------------------


@pytest.mark.parametrize("family", ["normal", "bernoulli", "bernoulli_probs"])
def test_ggn_equals_the_hessian_for_canonical_links(family: str) -> None:
    inputs = program_inputs(family)
    ggn = build_curvature("ggn", inputs)
    assert_close(ggn.to_dense(), hessian(inputs), **EXACT)
    diag = build_curvature("diag", inputs)
    assert isinstance(diag, DiagonalCurvature)
    assert_close(diag.to_dense(), torch.diag_embed(hessian(inputs).diagonal(dim1=1, dim2=2)))


def test_ggn_of_a_log_link_poisson_is_the_hessian() -> None:
    # rate = exp(0.3 f) is canonical up to the factor 0.3: Hessian 0.09 * rate * x xᵀ
    inputs = program_inputs("poisson")
    assert_close(build_curvature("ggn", inputs).to_dense(), hessian(inputs), **EXACT)


def _design(inputs: CurvatureInputs) -> Tensor:
    """Rows ``(x, 1)`` ``(T, N, 3)`` of the linear predictor."""
    return torch.cat([inputs.x, torch.ones_like(inputs.x[..., :1])], dim=-1)


def test_student_t_ggn_is_its_fisher_weighted_gram_matrix() -> None:
    inputs = program_inputs("studentt")
    X = _design(inputs)
    nu, scale = 4.0, 0.8
    expected = (nu + 1) / ((nu + 3) * scale**2) * X.transpose(1, 2) @ X + torch.eye(3)
    assert_close(build_curvature("ggn", inputs).to_dense(), expected, **EXACT)


def test_scale_depending_on_phi_adds_its_fisher() -> None:
    inputs = program_inputs("hetero")
    x0 = inputs.x[..., 0]
    phi = inputs.phi
    sigma = torch.exp(0.5 * x0 * phi[:, :1] - 0.3)  # (T, N)
    X = _design(inputs) / sigma.unsqueeze(-1)
    loc_part = X.transpose(1, 2) @ X
    # d sigma / d phi_0 = 0.5 x0 sigma, Fisher of the scale 2 / sigma^2
    scale_part = torch.zeros(3, 3, 3)
    scale_part[:, 0, 0] = (2 * (0.5 * x0) ** 2).sum(-1)
    expected = loc_part + scale_part + torch.eye(3)
    assert_close(build_curvature("ggn", inputs).to_dense(), expected, **EXACT)


def test_monte_carlo_fisher_matches_its_expectation() -> None:
    # Weibull(scale = exp(-0.4 f), concentration 1) = Exponential(rate = exp(0.4 f)): the Fisher
    # in log rate is 1, so the GGN is 0.16 X^T X; Weibull has no exact Fisher: Monte Carlo
    inputs = program_inputs("weibull")
    X = _design(inputs)
    expected = 0.16 * X.transpose(1, 2) @ X
    J = observation_jacobian(inputs, num_draws=4000, generator=torch.Generator().manual_seed(1))
    assert J.shape == (3, 4000 * 6, 3)
    assert_close(J.transpose(1, 2) @ J, expected, atol=0.15 * float(expected.abs().max()), rtol=0)
    # a fixed generator gives a fixed estimate; the global random state is left alone
    state = torch.get_rng_state()
    again = observation_jacobian(inputs, num_draws=4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())
    assert_close(again, J, atol=0, rtol=0)


# -- each exact Fisher against its definition ---------------------------------------------------


def _score_fisher(
    make: Callable[[Tensor], Any], eta: Tensor, ys: Tensor, weights: Tensor
) -> Tensor:
    r""":math:`\sum_y w(y) s(y)s(y)^\top` with :math:`s = \nabla_\eta \log p(y\mid\eta)`."""
    copies = eta.expand(ys.shape[0], *eta.shape).clone().requires_grad_(True)
    (scores,) = torch.autograd.grad(make(copies).log_prob(ys).sum(), copies)
    scores = scores.reshape(ys.shape[0], -1)
    return (weights.unsqueeze(-1) * scores).T @ scores


def _exact(make: Callable[[Tensor], Any], eta: Tensor) -> Tensor:
    r"""The exact Fisher in ``eta``: :math:`J^\top LL^\top J` with :math:`J` the Jacobian of
    the parameter ``exact_fisher`` works in (the logits of a Bernoulli or Categorical built
    from probabilities) with respect to ``eta``."""
    phi = torch.zeros(1, requires_grad=True)
    given = (eta + 0.0 * phi.sum()).detach().requires_grad_(True)
    fn = make(given)
    (piece,) = exact_fisher(fn, phi) or [None]  # type: ignore[list-item]
    assert piece is not None
    param, factor = piece
    L = torch.diag_embed(factor) if factor.dim() == 1 else factor
    flat = param.reshape(-1)
    rows = [torch.autograd.grad(flat[i], given, retain_graph=True)[0] for i in range(flat.numel())]
    J = torch.stack(rows).reshape(flat.numel(), -1)
    return (J.T @ L @ L.T @ J).detach()


@pytest.mark.parametrize(
    ("name", "make", "eta", "support"),
    [
        ("bernoulli-logits", lambda e: dist.Bernoulli(logits=e), torch.tensor(0.7), "binary"),
        ("bernoulli-probs", lambda e: dist.Bernoulli(probs=e), torch.tensor(0.3), "binary"),
        ("poisson", lambda e: dist.Poisson(e), torch.tensor(2.5), "counts"),
        (
            "categorical-logits",
            lambda e: dist.Categorical(logits=e),
            torch.tensor([0.2, -1.0, 0.5]),
            "classes",
        ),
        (
            "categorical-probs",
            lambda e: dist.Categorical(probs=e),
            torch.tensor([0.2, 0.5, 0.3]),
            "classes",
        ),
    ],
)
def test_discrete_fishers_by_enumeration(
    name: str, make: Callable[[Tensor], Any], eta: Tensor, support: str
) -> None:
    eta = eta.double()  # the parameters were made at collection, before float64 was set
    ys = {
        "binary": torch.tensor([0.0, 1.0]),
        "counts": torch.arange(0.0, 80.0),
        "classes": torch.arange(3),
    }[support]
    if name == "categorical-probs":
        eta = eta / eta.sum()  # float32 values that sum to 1 in float64
    weights = make(eta).log_prob(ys).exp()
    expected = _score_fisher(make, eta, ys, weights)
    exact = _exact(make, eta)
    if name == "categorical-probs":
        # Pyro normalises probs; its Jacobian I - p 1ᵀ maps the Fisher of normalised
        # probabilities, diag(1/p), to the one of the unnormalised ones, diag(1/p) - 1 1ᵀ
        project = torch.eye(3) - eta.unsqueeze(-1) * torch.ones(3)
        exact = project.T @ exact @ project
    assert_close(exact, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("make", "eta"),
    [
        (lambda e: dist.Normal(e[..., 0], e[..., 1]), torch.tensor([0.3, 0.7])),
        (lambda e: dist.StudentT(4.0, e[..., 0], e[..., 1]), torch.tensor([0.3, 0.7])),
    ],
    ids=["normal", "studentt"],
)
def test_continuous_fishers_by_quadrature(make: Callable[[Tensor], Any], eta: Tensor) -> None:
    # y = loc + scale * tan(u): the integral over the real line on a finite grid in u
    eta = eta.double()
    u = torch.linspace(-math.pi / 2, math.pi / 2, 20001)[1:-1]
    ys = eta[0] + eta[1] * torch.tan(u)
    du = u[1] - u[0]
    weights = make(eta).log_prob(ys).exp() * eta[1] / torch.cos(u).square() * du
    expected = _score_fisher(make, eta, ys, weights)
    phi = torch.zeros(1, requires_grad=True)
    pieces = exact_fisher(make(eta + 0.0 * phi.sum()), phi)
    assert pieces is not None and len(pieces) == 2  # loc and scale
    fisher = torch.diag(torch.stack([p[1].square().squeeze() for p in pieces]))
    assert_close(fisher, expected, atol=1e-5, rtol=1e-5)


# -- masks, gradients, errors ---------------------------------------------------------------------


def test_padded_points_contribute_nothing() -> None:
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    masked = program_inputs("bernoulli", mask=mask)
    full = build_curvature("ggn", masked).to_dense()
    trimmed = CurvatureInputs(
        masked.density,
        masked.params,
        masked.phi[1:2],
        masked.x[1:2, :4],
        masked.y[1:2, :4],
        None,
        masked.prior_precision,
        False,
    )
    assert_close(full[1:2], build_curvature("ggn", trimmed).to_dense(), **EXACT)


@pytest.mark.parametrize("curvature", ["ggn", "diag"])
def test_logdet_gradient_into_theta_by_finite_differences(curvature: str) -> None:
    base = program_inputs("bernoulli", T=2, N=4)

    def logdet(theta: Tensor) -> Tensor:
        # one gradient step from theta: phi depends on theta as the inner loop's does
        phi0 = theta.expand(2, 3)
        ll = base.density.log_likelihood({"theta": theta}, phi0, base.x, base.y)
        (grad,) = torch.autograd.grad(ll.sum(), phi0, create_graph=True)
        phi = phi0 + 0.3 * grad
        inputs = CurvatureInputs(
            base.density, {"theta": theta}, phi, base.x, base.y, None, base.prior_precision
        )
        return build_curvature(curvature, inputs).logdet().sum()

    theta = torch.tensor([0.2, -0.4, 0.1], requires_grad=True)
    assert torch.autograd.gradcheck(logdet, (theta,), eps=1e-6, atol=1e-7)


def test_kfac_stays_network_only() -> None:
    with pytest.raises(ModelContractError):
        build_curvature("kfac", program_inputs("normal"))


@pytest.mark.parametrize("family", ["bernoulli", "normal"])
def test_a_distribution_mask_in_the_program_drops_its_points(family: str) -> None:
    """``fn.mask(keep)`` inside the program weighs the masked points out of the GGN exactly as
    a padding mask of the same points does (the mask is read through ``log_prob``)."""
    padded = program_inputs(family, mask=None)
    keep = padded.x[..., 0] > -0.3  # (T, N), some of each task's points dropped
    assert not bool(keep.all()) and bool(keep.any(1).all())

    def masked(x: Tensor, y: Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 5.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            f = (x * phi[..., :2]).sum(-1) + phi[..., 2]
            with pyro.plate("data", x.shape[1], dim=-1):
                fn: Any = dist.Bernoulli(logits=f) if family == "bernoulli" else dist.Normal(f, 0.7)
                pyro.sample("y", fn.mask(x[..., 0] > -0.3), obs=y)

    structure = model_structure(masked, padded.x, padded.y)
    inputs = CurvatureInputs(
        PyroTaskDensity(masked, structure),
        padded.params,
        padded.phi,
        padded.x,
        padded.y,
        None,
        padded.prior_precision,
        False,
    )
    reference = program_inputs(family, mask=keep)
    for curvature in ("ggn", "diag"):
        assert_close(
            build_curvature(curvature, inputs).to_dense(),
            build_curvature(curvature, reference).to_dense(),
            **EXACT,
        )
