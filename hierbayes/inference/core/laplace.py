r"""The pieces of each task's Laplace posterior: its prior precision, the data a curvature is
of, and the linearised predictive.

The Laplace posterior of task :math:`j` is :math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})`, with
:math:`\hat H_j = C_j + P` a curvature of the negative log likelihood plus the prior precision
:math:`P` (:func:`prior_precision`). The linearised predictive at new inputs is

.. math::

    y_* \sim \mathcal N\big(f(x_*;\hat\phi_j),\; \sigma^2 + J_*\hat H_j^{-1}J_*^\top\big)

(Immer, Korzepa & Bauer 2021). The evidence is in :mod:`hierbayes.inference.core.evidence`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.core.numerics import clamp_nonnegative
from hierbayes.inference.curvature import (
    CurvatureEstimate,
    CurvatureInputs,
    GGNCurvature,
    output_jacobian,
)
from hierbayes.inference.predictions import GaussianPrediction
from hierbayes.models.density import DiagonalPriorDensity, NetworkDensity, TaskDensity

__all__ = [
    "linearized_predictive",
    "noise_variance",
    "predictive_output_variance",
    "prior_precision",
    "select_data",
]


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
