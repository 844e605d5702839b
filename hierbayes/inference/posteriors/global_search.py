r"""The search for the optimum of the log marginal posterior of the globals, :math:`\hat u`.

:func:`~hierbayes.inference.posteriors.hyper_laplace.hyper_laplace` maximises
:math:`\mathcal L(u)` over the unconstrained globals by the damped, monotone Newton iteration of
:func:`~hierbayes.inference.core.mode.damped_newton` (one problem, ``T = 1``), with the exact
Hessian of :math:`\mathcal L` (automatic differentiation through the task modes). Where
:math:`-\nabla^2\mathcal L` is not positive definite (far from the optimum) the step is a
gradient step scaled by the size of the curvature's diagonal. Each trial point's task modes
are found warm-started from the last accepted point's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hierbayes.errors import NumericalError
from hierbayes.inference.core.mode import damped_newton
from hierbayes.inference.curvature import CurvatureEstimate, DenseCurvature, DiagonalCurvature
from hierbayes.inference.posteriors.task_modes import TaskModes

__all__ = ["GlobalSearch", "search_globals"]

ModesAt = Callable[[Tensor, "Tensor | None"], TaskModes]
ValueOf = Callable[[Tensor, TaskModes], Tensor]
Derivatives = Callable[[Tensor, TaskModes], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class GlobalSearch:
    r"""Where the search over :math:`u` ended: the point, its task modes, :math:`\mathcal L`, its
    gradient and Hessian there, the Newton steps taken, and whether (and why) it stopped."""

    u: Tensor
    modes: TaskModes
    value: Tensor
    grad: Tensor
    hess: Tensor
    steps: int
    converged: bool
    reason: str


def _curvature(hess: Tensor) -> CurvatureEstimate:
    """:math:`-\\nabla^2\\mathcal L` as a one-problem curvature, or a scaled diagonal where it is
    not positive definite (a gradient step)."""
    precision = -hess
    chol, info = torch.linalg.cholesky_ex(precision)
    if int(info) == 0:
        return DenseCurvature(precision[None], chol[None])
    return DiagonalCurvature(precision.diagonal().abs().clamp_min(1.0)[None])


def search_globals(
    start: Tensor,
    modes_at: ModesAt,
    value_of: ValueOf,
    derivatives: Derivatives,
    *,
    max_steps: int,
    tolerance: float,
) -> GlobalSearch:
    r"""Maximise :math:`\mathcal L(u)` from ``start`` ``(K,)``.

    ``modes_at(u, warm_start)`` finds the task modes at ``u``; ``value_of(u, modes)`` gives
    :math:`\mathcal L` there (no graph) and ``derivatives(u, modes)`` :math:`\mathcal L`, its
    gradient and its Hessian. Stops when the Newton decrement
    :math:`\tfrac12\nabla\mathcal L^\top(-\nabla^2\mathcal L)^{-1}\nabla\mathcal L` is below
    ``tolerance`` (converged), when no halving of a step raises :math:`\mathcal L`, or after
    ``max_steps`` steps (not converged: the reason says which)."""
    found: list[tuple[Tensor, TaskModes]] = [(start, modes_at(start, None))]
    last: dict[str, Tensor] = {}

    def lookup(u: Tensor) -> TaskModes:
        for point, modes in reversed(found):
            if torch.equal(point, u):
                return modes
        modes = modes_at(u, found[-1][1].phi)
        found.append((u, modes))
        return modes

    def evaluate(point: Tensor) -> tuple[Tensor, Tensor, CurvatureEstimate]:
        u = point[0]
        modes = lookup(u)
        found[:] = [(u, modes)]  # the accepted point: later trials start from its modes
        value, grad, hess = derivatives(u, modes)
        last.update(value=value, grad=grad, hess=hess)
        return value[None], grad[None], _curvature(hess)

    def value_at(points: Tensor) -> Tensor:
        u = points[0]
        try:
            modes = lookup(u)
            with torch.no_grad():
                value = value_of(u, modes)
        except NumericalError:
            return points.new_full((1,), -math.inf)
        return value.reshape(1)

    search = damped_newton(
        start[None],
        evaluate,
        value_at,
        steps=max_steps,
        tolerance=tolerance,
        max_halvings=30,
        create_graph=False,
    )
    u = search.phi[0]
    converged = bool(search.converged[0]) and isinstance(search.curvature, DenseCurvature)
    if converged:
        reason = f"Newton decrement {float(search.decrement[0]):.3g} <= tolerance {tolerance:g}"
    elif bool(search.rejected[0]):
        reason = "no halving of the Newton step raised the log marginal (the line search failed)"
    elif bool(search.failed[0]):
        reason = "the Newton direction was not finite"
    elif search.steps == max_steps:
        reason = f"max_steps={max_steps} Newton steps were taken"
    else:
        reason = "the log marginal is not concave where the search stopped"
    return GlobalSearch(
        u,
        lookup(u),
        last["value"],
        last["grad"],
        last["hess"],
        search.steps,
        converged,
        reason,
    )
