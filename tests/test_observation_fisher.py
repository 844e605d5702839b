r"""Exact Fisher informations of the observation families, against their definition.

Each family's :func:`~hierbayes.inference.curvature.observation.exact_fisher` (pulled back to
the parameters the distribution was built with) is checked against
:math:`F = \mathbb E_y[s(y)s(y)^\top]`, :math:`s = \nabla_\eta\log p(y\mid\eta)` by autograd:
by enumeration for counts, by double-exponential quadrature over the quantiles for continuous
families, all in float64. Then the observation GGN of plain programs: a Binomial program's
equals the exact Hessian (canonical link), the probabilities and logits parametrisations
give the same matrix, every listed family takes the exact path (one row per point and
parameter, no draws), and a family left to Monte Carlo is a deterministic function of its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch import Tensor
from torch.testing import assert_close

from hierbayes.inference.curvature import CurvatureInputs, build_curvature
from hierbayes.inference.curvature.observation import (
    FISHER_DRAWS,
    exact_fisher,
    observation_jacobian,
)
from hierbayes.models import PyroTaskDensity, model_structure

Make = Callable[[Tensor], Any]


def _score_fisher(make: Make, eta: Tensor, ys: Tensor, weights: Tensor) -> Tensor:
    r""":math:`\sum_i w_i s(y_i)s(y_i)^\top` with :math:`s = \nabla_\eta\log p(y\mid\eta)`."""
    copies = eta.expand(ys.shape[0], *eta.shape).clone().requires_grad_(True)
    (scores,) = torch.autograd.grad(make(copies).log_prob(ys).sum(), copies)
    scores = scores.reshape(ys.shape[0], -1)
    return (weights.unsqueeze(-1) * scores).T @ scores


def _exact(make: Make, eta: Tensor) -> Tensor:
    r""":math:`\sum_p J_p^\top L_pL_p^\top J_p` over the pieces ``exact_fisher`` returns, with
    :math:`J_p` the Jacobian of piece :math:`p`'s parameters in ``eta`` (every entry of ``eta``
    depends on :math:`\phi`)."""
    phi = torch.zeros(1, requires_grad=True)
    given = (eta + 0.0 * phi.sum()).detach().requires_grad_(True)
    pieces = exact_fisher(make(given), given)
    assert pieces is not None, "no exact Fisher"
    total = torch.zeros(eta.numel(), eta.numel())
    for param, factor in pieces:
        flat = param.reshape(-1)
        L = torch.diag_embed(factor.reshape(-1)) if factor.dim() == 1 else factor
        rows = [
            torch.autograd.grad(flat[i], given, retain_graph=True)[0].reshape(-1)
            for i in range(flat.numel())
        ]
        J = torch.stack(rows)
        total = total + (J.T @ L @ L.T @ J).detach()
    return total


# -- counts: by enumeration ----------------------------------------------------------------------

DISCRETE: list[tuple[str, Make, float, int]] = [
    ("binomial-logits", lambda e: dist.Binomial(12.0, logits=e), -0.8, 13),
    ("binomial-probs", lambda e: dist.Binomial(12.0, probs=e), 0.3, 13),
    ("geometric-logits", lambda e: dist.Geometric(logits=e), 0.4, 400),
    ("geometric-probs", lambda e: dist.Geometric(probs=e), 0.35, 400),
    ("negbinomial-logits", lambda e: dist.NegativeBinomial(3.5, logits=e), 0.2, 600),
    ("negbinomial-probs", lambda e: dist.NegativeBinomial(3.5, probs=e), 0.45, 600),
]


@pytest.mark.parametrize(("name", "make", "eta", "support"), DISCRETE, ids=[d[0] for d in DISCRETE])
def test_count_fishers_by_enumeration(name: str, make: Make, eta: float, support: int) -> None:
    value = torch.tensor(eta)  # a scalar parameter: one probability for every count
    ys = torch.arange(0.0, float(support))
    weights = make(value).log_prob(ys).exp()
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-13)  # the support is covered
    assert_close(
        _exact(make, value), _score_fisher(make, value, ys, weights), atol=1e-11, rtol=1e-10
    )


# -- continuous families: quadrature over the quantiles ------------------------------------------


def _quantile_nodes(frozen: Any, step: float = 1 / 64, reach: float = 4.5) -> tuple[Tensor, Tensor]:
    r"""Nodes and weights of :math:`\int_0^1 f(F^{-1}(u))\,du` by the double-exponential rule
    (Takahasi & Mori 1974) on each half, :math:`u = \tfrac12\operatorname{expit}(\pi\sinh t)`
    below the median and :math:`1 - u` so above it (through the survival function, so that
    :math:`1 - u` keeps its digits): its endpoint decay absorbs the score's growth in the
    tails, and a score with a kink at the median (Laplace) is smooth on each half."""
    t = np.arange(-reach, reach + step / 2, step)
    z = math.pi * np.sinh(t)
    half = 0.5 / (1 + np.exp(-z))  # u in (0, 1/2), and 1 - u above the median
    w = 0.5 / (1 + np.exp(-z)) / (1 + np.exp(z)) * math.pi * np.cosh(t) * step
    x = np.concatenate([frozen.ppf(half), frozen.isf(half)])
    w = np.concatenate([w, w])
    inside = frozen.logpdf(x) > -np.inf  # not rounded onto the edge of the support
    keep = np.isfinite(x) & (w > 0) & inside
    return torch.from_numpy(x[keep]), torch.from_numpy(w[keep])


CONTINUOUS: list[tuple[str, Make, list[float], Callable[[list[float]], Any]]] = [
    (
        "gamma",
        lambda e: dist.Gamma(e[..., 0], e[..., 1]),
        [2.5, 1.7],
        lambda e: stats.gamma(e[0], scale=1 / e[1]),
    ),
    (
        "gamma-small-shape",
        lambda e: dist.Gamma(e[..., 0], e[..., 1]),
        [0.6, 0.8],
        lambda e: stats.gamma(e[0], scale=1 / e[1]),
    ),
    (
        "exponential",
        lambda e: dist.Exponential(e[..., 0]),
        [1.7],
        lambda e: stats.expon(scale=1 / e[0]),
    ),
    (
        "beta",
        lambda e: dist.Beta(e[..., 0], e[..., 1]),
        [2.0, 3.5],
        lambda e: stats.beta(e[0], e[1]),
    ),
    (
        "lognormal",
        lambda e: dist.LogNormal(e[..., 0], e[..., 1]),
        [0.3, 0.6],
        lambda e: stats.lognorm(e[1], scale=math.exp(e[0])),
    ),
    (
        "laplace",
        lambda e: dist.Laplace(e[..., 0], e[..., 1]),
        [0.3, 0.8],
        lambda e: stats.laplace(e[0], e[1]),
    ),
    (
        "cauchy",
        lambda e: dist.Cauchy(e[..., 0], e[..., 1]),
        [-0.4, 1.3],
        lambda e: stats.cauchy(e[0], e[1]),
    ),
    (
        "halfnormal",
        lambda e: dist.HalfNormal(e[..., 0]),
        [1.4],
        lambda e: stats.halfnorm(scale=e[0]),
    ),
    (
        "halfcauchy",
        lambda e: dist.HalfCauchy(e[..., 0]),
        [0.9],
        lambda e: stats.halfcauchy(scale=e[0]),
    ),
    (
        "gumbel",
        lambda e: dist.Gumbel(e[..., 0], e[..., 1]),
        [0.5, 1.2],
        lambda e: stats.gumbel_r(e[0], e[1]),
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "eta", "frozen"), CONTINUOUS, ids=[c[0] for c in CONTINUOUS]
)
def test_continuous_fishers_by_quadrature(
    name: str, make: Make, eta: list[float], frozen: Callable[[list[float]], Any]
) -> None:
    value = torch.tensor(eta)
    ys, weights = _quantile_nodes(frozen(eta))
    expected = _score_fisher(make, value, ys, weights)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert_close(_exact(make, value), expected, atol=1e-9, rtol=1e-8)


def test_only_the_parameters_that_depend_on_phi_get_rows() -> None:
    # Gamma with a fixed concentration: one piece, the rate's alpha / beta^2, not the 2 x 2 block
    phi = torch.tensor([0.3], requires_grad=True)
    rate = torch.exp(phi).expand(4)
    pieces = exact_fisher(dist.Gamma(torch.tensor(2.5), rate), phi)
    assert pieces is not None and len(pieces) == 1
    param, factor = pieces[0]
    assert param.shape == (4, 1) and factor.shape == (4, 1)
    assert_close(factor.square().squeeze(-1), 2.5 / rate.detach().square(), atol=1e-14, rtol=1e-14)


def test_negative_binomial_with_a_varying_total_count_stays_monte_carlo() -> None:
    phi = torch.tensor([0.3], requires_grad=True)
    fn = dist.NegativeBinomial(total_count=torch.exp(phi) * 3.0, logits=phi * 0.5)
    assert exact_fisher(fn, phi) is None


# -- plain programs --------------------------------------------------------------------------------


def _program(observation: Callable[[Tensor, Tensor], Any], D: int = 2) -> Callable[..., Any]:
    """``model(x, y=None)``: theta global, phi ``(D,)`` per task, ``f = x0·phi0 + phi1`` into
    ``observation(f, x)`` in a data plate."""

    def model(x: Tensor, y: Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(torch.zeros(D), 3.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            f = x[..., 0] * phi[..., 0] + phi[..., 1]
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("y", observation(f, x), obs=y)

    return model


def _inputs(
    observation: Callable[[Tensor, Tensor], Any], T: int = 3, N: int = 5, seed: int = 0
) -> CurvatureInputs:
    g = torch.Generator().manual_seed(seed)
    model = _program(observation)
    x = torch.rand(T, N, 2, generator=g) * 2 - 1
    x[..., 1] = torch.randint(1, 20, (T, N), generator=g).double()  # trials for the Binomial
    with pyro.poutine.seed(rng_seed=seed):
        y = pyro.poutine.trace(model).get_trace(x).nodes["y"]["value"].detach()
    structure = model_structure(model, x, y)
    phi = 0.5 * torch.randn(T, 2, generator=g)
    params = {"theta": torch.zeros(2)}
    return CurvatureInputs(
        PyroTaskDensity(model, structure), params, phi, x, y, None, torch.ones(2)
    )


def _binomial_logits(f: Tensor, x: Tensor) -> Any:
    return dist.Binomial(total_count=x[..., 1], logits=f)


def _binomial_probs(f: Tensor, x: Tensor) -> Any:
    return dist.Binomial(total_count=x[..., 1], probs=torch.sigmoid(f))


def test_binomial_ggn_is_the_exact_hessian() -> None:
    # logits are the canonical parameter and affine in phi: the GGN is -d^2 log p exactly
    inputs = _inputs(_binomial_logits)
    hessian = build_curvature("full", inputs).to_dense()
    assert_close(build_curvature("ggn", inputs).to_dense(), hessian, atol=1e-11, rtol=1e-11)
    assert observation_jacobian(inputs).shape == (3, 5, 2)  # one row a point: no draws


def test_binomial_in_probabilities_is_the_same_ggn_as_in_logits() -> None:
    logits = build_curvature("ggn", _inputs(_binomial_logits)).to_dense()
    probs = build_curvature("ggn", _inputs(_binomial_probs)).to_dense()
    assert_close(probs, logits, atol=1e-10, rtol=1e-10)


PROGRAMS: dict[str, tuple[Callable[[Tensor, Tensor], Any], int]] = {
    # name: (observation at linear predictor f, parameters that depend on phi)
    "binomial": (_binomial_logits, 1),
    "geometric": (lambda f, x: dist.Geometric(logits=f), 1),
    "negbinomial": (lambda f, x: dist.NegativeBinomial(4.0, logits=f), 1),
    "gamma": (lambda f, x: dist.Gamma(torch.exp(0.3 * f), torch.exp(-0.2 * f)), 2),
    "exponential": (lambda f, x: dist.Exponential(torch.exp(0.4 * f)), 1),
    "beta": (lambda f, x: dist.Beta(torch.exp(0.3 * f), torch.exp(-0.3 * f)), 2),
    "lognormal": (lambda f, x: dist.LogNormal(f, 0.6), 1),
    "laplace": (lambda f, x: dist.Laplace(f, torch.exp(0.2 * f)), 2),
    "cauchy": (lambda f, x: dist.Cauchy(f, 0.8), 1),
    "halfnormal": (lambda f, x: dist.HalfNormal(torch.exp(0.3 * f)), 1),
    "halfcauchy": (lambda f, x: dist.HalfCauchy(torch.exp(0.3 * f)), 1),
    "gumbel": (lambda f, x: dist.Gumbel(f, 0.9), 1),
}


@pytest.mark.parametrize("family", sorted(PROGRAMS))
def test_every_listed_family_takes_the_exact_path(family: str) -> None:
    r"""No draws (one row per point and parameter), and :math:`\tilde J^\top\tilde J` equals
    :math:`\sum_n J_n^\top F_n J_n` with :math:`J_n` by autograd and :math:`F_n` from the
    score's second moment over draws (Monte Carlo, independent of the library's path)."""
    observation, k = PROGRAMS[family]
    inputs = _inputs(observation, T=2, N=3)
    J = observation_jacobian(inputs)
    assert J.shape == (2, 3 * k, 2)
    ggn = J.transpose(1, 2) @ J
    # the reference: per point, E[g g^T] with g = d log p(y | phi) / d phi over many draws
    draws = 200_000
    phi = inputs.phi.clone().requires_grad_(True)
    f = inputs.x[..., 0] * phi[:, None, 0] + phi[:, None, 1]
    fn = observation(f, inputs.x)
    with torch.no_grad():
        ys = fn.sample(torch.Size([draws]))
    expected = torch.zeros(2, 2, 2)
    for t in range(2):
        for n in range(3):
            phi_tn = inputs.phi[t].expand(draws, 2).clone().requires_grad_(True)
            x_tn = inputs.x[t, n].expand(draws, 2)
            f_tn = x_tn[..., 0] * phi_tn[..., 0] + phi_tn[..., 1]
            lp = observation(f_tn, x_tn).log_prob(ys[:, t, n])
            (g,) = torch.autograd.grad(lp.sum(), phi_tn)
            expected[t] += g.T @ g / draws
    assert_close(ggn, expected, atol=0.03 * float(expected.abs().max()), rtol=0.03)


def _monte_carlo_family(f: Tensor, x: Tensor) -> Any:
    return dist.Weibull(torch.exp(0.3 * f), 1.5)  # no exact Fisher: Monte Carlo


def test_a_monte_carlo_family_is_a_deterministic_function_of_its_input() -> None:
    inputs = _inputs(_monte_carlo_family)
    torch.manual_seed(1)
    first = observation_jacobian(inputs)
    assert first.shape == (3, FISHER_DRAWS * 5, 2)
    torch.manual_seed(2)  # another global random state: the same draws
    state = torch.get_rng_state()
    second = observation_jacobian(inputs)
    assert torch.equal(state, torch.get_rng_state())  # and the global stream left alone
    assert_close(second, first, atol=0, rtol=0)
    # so is the GGN's log determinant, the objective a line search evaluates
    assert_close(
        build_curvature("ggn", inputs).logdet(),
        build_curvature("ggn", inputs).logdet(),
        atol=0,
        rtol=0,
    )
