r"""Laplace approximations of each task, as pure functions: its evidence and the pieces of its
Gaussian posterior and linearised predictive.

Around :math:`\hat\phi_j` (the guide's adapted parameters) with :math:`g_j` the gradient and
:math:`\hat H_j` the curvature of the log joint :math:`\log p(\mathcal D_j\mid\phi) +
\log p(\phi\mid\theta)`, the second-order expansion integrates to

.. math::

    \log p(\mathcal D_j \mid \theta) \approx \log p(\mathcal D_j\mid\hat\phi_j)
        + \log p(\hat\phi_j\mid\theta) + \tfrac12 g_j^\top \hat H_j^{-1} g_j
        - \tfrac12\log\det\hat H_j + \tfrac D2\log 2\pi

(MATH.md §4; Laplace 1774, MacKay 1992). At a mode :math:`g_j = 0` and this is the classical
Laplace evidence; the :math:`\tfrac12 g^\top\hat H^{-1}g` term (one Newton step) makes it exact
for the linear-Gaussian model at *any* :math:`\hat\phi_j`, which matters because truncated
gradient descent stops short of the mode.

The linearised predictive at new inputs is

.. math::

    y_* \sim \mathcal N\big(f(x_*;\hat\phi_j),\; \sigma^2 + J_*\hat H_j^{-1}J_*^\top\big)

(Immer, Korzepa & Bauer 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.core.numerics import clamp_nonnegative
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureEstimate,
    CurvatureInputs,
    GGNCurvature,
    build_curvature,
    output_jacobian,
)
from hierbayes.inference.posteriors.predictive import GaussianPrediction
from hierbayes.models.density import DiagonalPriorDensity, NetworkDensity, TaskDensity

__all__ = [
    "laplace_log_evidence",
    "linearized_predictive",
    "noise_variance",
    "predictive_output_variance",
    "prior_precision",
    "select_data",
]

_LOG_2PI = math.log(2 * math.pi)


def prior_precision(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    num_tasks: int,
    *,
    damping: float | None = None,
) -> Tensor:
    r"""The diagonal prior precision :math:`P`, ``(T, D)``: :math:`1/s^2` from the model's
    :math:`p(\phi\mid\theta)`, or ``damping`` :math:`\tau` when given."""
    D = density.structure.num_params
    ref = next(iter(params.values())) if params else torch.zeros(())
    if damping is not None:
        if not damping > 0:
            raise ValueError(f"damping must be positive; got {damping}")
        return torch.full((num_tasks, D), float(damping), dtype=ref.dtype, device=ref.device)
    if not isinstance(density, DiagonalPriorDensity):
        raise ModelContractError(
            "this model does not state its prior precision (DiagonalPriorDensity); pass "
            "damping=τ to use τI as the prior's curvature"
        )
    return density.prior_precision(params).expand(num_tasks, D)


def _concat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a, b], dim=1)


def select_data(
    support: tuple[Tensor, Tensor, Tensor | None],
    query: tuple[Tensor, Tensor, Tensor | None] | None,
    which: Literal["support", "query", "both"],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The ``(x, y, mask)`` a curvature or evidence is computed on."""
    if which == "support":
        return support
    if query is None:
        raise ValueError(f"curvature data {which!r} needs a query set")
    if which == "query":
        return query
    xs, ys, ms = support
    xq, yq, mq = query
    if ms is None and mq is None:
        mask = None
    else:
        ms_ = ms if ms is not None else torch.ones(xs.shape[:2], dtype=torch.bool, device=xs.device)
        mq_ = mq if mq is not None else torch.ones(xq.shape[:2], dtype=torch.bool, device=xq.device)
        mask = _concat(ms_, mq_)
    return _concat(xs, xq), _concat(ys, yq), mask


def laplace_log_evidence(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    curvature: str | CurvatureBuilder = "ggn",
    precision: Tensor | None = None,
    newton_correction: bool = True,
    create_graph: bool | None = None,
) -> Tensor:
    r"""Laplace approximation of :math:`\log p(\mathcal D_j\mid\theta)` per task, ``(T,)``.

    Parameters
    ----------
    phi:
        ``(T, D)`` expansion points (differentiable into :math:`\theta`).
    x, y, mask:
        The task data :math:`\mathcal D_j`.
    curvature:
        A registered curvature name or builder; ``"full"`` (or ``"ggn"`` for the
        linear-Gaussian model, where the two coincide) makes the result exact there.
    precision:
        Diagonal prior precision ``(T, D)``; by default the model's.
    newton_correction:
        Add :math:`\tfrac12 g^\top\hat H^{-1} g` (see the module docstring).
    """
    create_graph = torch.is_grad_enabled() if create_graph is None else create_graph
    T, D = phi.shape
    P = prior_precision(density, params, T) if precision is None else precision
    with torch.enable_grad():
        point = phi if phi.requires_grad else phi.detach().requires_grad_(True)
        log_joint = density.log_likelihood(params, point, x, y, mask) + density.log_prior(
            params, point, x
        )
        if newton_correction:
            (grad,) = torch.autograd.grad(log_joint.sum(), point, create_graph=create_graph)
    estimate = build_curvature(
        curvature, CurvatureInputs(density, params, point, x, y, mask, P, create_graph)
    )
    value = log_joint - 0.5 * estimate.logdet() + 0.5 * D * _LOG_2PI
    if newton_correction:
        value = value + 0.5 * estimate.inv_quad(grad)
    return value if create_graph else value.detach()


def noise_variance(
    density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, f: Tensor
) -> Tensor:
    r"""The Gaussian observation-noise variance :math:`\sigma^2` shaped like ``f``."""
    if not isinstance(density, NetworkDensity) or not density.likelihood.noise_variance_known:
        raise ModelContractError("a linearised Gaussian predictive needs a Gaussian likelihood")
    return density.noise_variance(params, phi, f)


def predictive_output_variance(
    estimate: CurvatureEstimate,
    inputs: CurvatureInputs,
    x: Tensor,
    *,
    jacobian: str = "auto",
) -> tuple[Tensor, Tensor]:
    r"""Network outputs :math:`f(x_*;\hat\phi)` and :math:`\operatorname{diag}(J_*\hat H^{-1}J_*^\top)`,
    both ``(T, M, C)``."""
    query_jac, f = output_jacobian(inputs, x=x, mask=None, whiten=False, method=jacobian)
    T, M, C = f.shape
    if isinstance(estimate, GGNCurvature):
        var = estimate.predictive_variance(query_jac)
    else:
        J = query_jac.dense()  # (T, R, D)
        var = (J * estimate.solve(J.transpose(1, 2)).transpose(1, 2)).sum(-1)
    variance = clamp_nonnegative(
        var.reshape(T, M, C), "the linearised predictive's epistemic variance diag(J H^-1 J^T)"
    )
    return f, variance


def linearized_predictive(
    estimate: CurvatureEstimate,
    inputs: CurvatureInputs,
    x: Tensor,
    *,
    jacobian: str = "auto",
) -> GaussianPrediction:
    r"""The linearised Laplace predictive :math:`\mathcal N(f_*, \sigma^2 + J_*\hat H^{-1}J_*^\top)`."""
    f, var = predictive_output_variance(estimate, inputs, x, jacobian=jacobian)
    return GaussianPrediction(f, var + noise_variance(inputs.density, inputs.params, inputs.phi, f))
