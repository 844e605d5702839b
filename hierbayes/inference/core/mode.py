r"""Each task's posterior mode by damped Newton steps, as a pure function.

From a starting point :math:`\phi_{(0)}` (the guide's truncated-gradient :math:`\hat\phi_j`),
with :math:`\ell_j(\phi) = \log p(\mathcal D_j\mid\phi) + \log p(\phi\mid\theta)` the task's log
joint, :math:`g = \nabla_\phi\ell_j` and :math:`\hat H` a curvature estimate of
:math:`-\nabla^2_\phi\ell_j` (any registered backend: the GGN makes it Gauss--Newton, or Fisher
scoring for a non-Gaussian likelihood),

.. math::

    \phi_{(k+1)} = \phi_{(k)} + \alpha_k\,\hat H^{-1}g, \qquad
    \alpha_k = \max\{2^{-h} : h = 0, \ldots, H,\ \ell_j(\phi_{(k)} + 2^{-h}\hat H^{-1}g)
        \ge \ell_j(\phi_{(k)})\},

and :math:`\alpha_k = 0` (the step is rejected and the task stops) when no halving raises the
log joint: the iteration is monotone, :math:`\ell_j(\phi_{(k+1)}) \ge \ell_j(\phi_{(k)})`.
Where the full step is accepted, :math:`\alpha_k = 2, 4, 8` are tried while each raises the
log joint further, for a curvature that overstates the Hessian far from the mode (a Fisher
with a heavy-tailed likelihood); for a quadratic log joint :math:`\alpha = 2` only returns to
the starting value and is never taken.
A task stops when its **Newton decrement**

.. math::

    \delta_j = \tfrac12\, g^\top\hat H^{-1} g

falls below ``tolerance``. :math:`\delta_j` is the gain of a full Newton step predicted by the
quadratic model, i.e. how many nats the log joint (and so the Laplace evidence without its
correction) lies below the mode, to second order; :math:`\sqrt{2\delta_j}` is the distance to
the mode in posterior standard deviations (the :math:`\hat H` norm of the Newton step). Unlike
:math:`\lVert g\rVert`, it does not change with the units of :math:`\phi` or the number of data
points, so one tolerance serves every model; :math:`\lVert g\rVert` is reported too.

With ``create_graph`` the result is a differentiable function of the starting point, the
global values and the prior precision (the step sizes :math:`\alpha_k` are constants): the
meta-gradient of a Laplace evidence at :math:`\phi_{(k)}` flows through the refined mode into
:math:`\theta` (for the linear-Gaussian model one step reaches the exact mode, and the gradient
is exact). References: Nocedal & Wright (2006), *Numerical Optimization*, §3.1 (backtracking)
and §3.3 (the Newton decrement); Boyd & Vandenberghe (2004), §9.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureEstimate,
    CurvatureInputs,
    build_curvature,
)
from hierbayes.models.density import TaskDensity

__all__ = ["ModeReport", "ModeSearch", "log_joint", "newton_mode"]

_LOG_2PI = math.log(2 * math.pi)
#: How often an accepted full step is doubled while the log joint keeps rising.
_MAX_DOUBLINGS = 3


class ModeReport(NamedTuple):
    r"""Where a mode search ended, detached (what an objective keeps after each call).

    Attributes
    ----------
    steps:
        Newton steps taken.
    gradient_norm, decrement, distance:
        ``(T,)`` :math:`\lVert g_j\rVert`, :math:`\tfrac12 g^\top\hat H^{-1}g` and
        :math:`\sqrt{g^\top\hat H^{-1}g}` at the last iterate.
    converged:
        ``(T,)`` whether each task's decrement is within the tolerance.
    """

    steps: int
    gradient_norm: Tensor
    decrement: Tensor
    distance: Tensor
    converged: Tensor


class ModeSearch(NamedTuple):
    r"""The result of :func:`newton_mode`: the last iterate and everything known there.

    Attributes
    ----------
    phi:
        ``(T, D)`` the last iterate (differentiable when the search kept a graph).
    log_joint:
        ``(T,)`` :math:`\ell_j` at ``phi``.
    gradient:
        ``(T, D)`` :math:`g_j` at ``phi``.
    curvature:
        :math:`\hat H_j` at ``phi``.
    decrement:
        ``(T,)`` :math:`\tfrac12 g^\top\hat H^{-1}g` at ``phi`` (differentiable like ``phi``).
    history:
        ``(steps + 1, T)`` the log joint at every iterate, detached (non-decreasing per task).
    steps:
        Newton steps taken (``0``: only the starting point was evaluated).
    rejected:
        ``(T,)`` whether the task's last step was rejected at every halving (it stopped early).
    converged:
        ``(T,)`` whether the task's decrement is within the tolerance.
    """

    phi: Tensor
    log_joint: Tensor
    gradient: Tensor
    curvature: CurvatureEstimate
    decrement: Tensor
    history: Tensor
    steps: int
    rejected: Tensor
    converged: Tensor

    @property
    def gradient_norm(self) -> Tensor:
        r""":math:`\lVert g_j\rVert` at ``phi``, ``(T,)``, detached."""
        return self.gradient.detach().norm(dim=-1)

    @property
    def distance(self) -> Tensor:
        r""":math:`\sqrt{g^\top\hat H^{-1}g}`: how many posterior standard deviations (in the
        :math:`\hat H` norm) ``phi`` lies from the mode, to second order, ``(T,)``, detached."""
        return (2 * self.decrement.detach()).clamp_min(0.0).sqrt()

    def report(self) -> ModeReport:
        """The detached summary of this search (no graph, no curvature kept)."""
        return ModeReport(
            self.steps,
            self.gradient_norm,
            self.decrement.detach(),
            self.distance,
            self.converged,
        )

    def log_evidence(self, *, newton_correction: bool = True) -> Tensor:
        r"""The Laplace evidence at ``phi``, ``(T,)``:

        .. math::

            \ell_j(\phi) - \tfrac12\log\det\hat H_j + \tfrac D2\log 2\pi
                \;[+\ \tfrac12 g^\top\hat H^{-1}g],

        the same value as :func:`~hierbayes.inference.core.laplace.laplace_log_evidence` at
        ``phi``, from the search's own curvature (no second build).

        After a search (``steps > 0``) the correction is added only for the tasks that
        converged, where it is below the tolerance and the quadratic model it extrapolates is
        accurate. A task that stopped short keeps its log joint at the last iterate, which
        lies below the log joint at the mode: far from the mode the quadratic model's
        :math:`\tfrac12 g^\top\hat H^{-1}g` can be far above the true gain (a Gauss--Newton
        :math:`\hat H` of a classifier made "-log evidence" of discrete labels negative,
        repro_12), and meta-training would exploit it. With ``steps = 0`` the correction is
        applied everywhere: one Newton step from any point, exact for the linear-Gaussian
        model."""
        D = self.phi.shape[-1]
        value = self.log_joint - 0.5 * self.curvature.logdet() + 0.5 * D * _LOG_2PI
        if not newton_correction:
            return value
        if self.steps == 0:
            return value + self.decrement
        return value + torch.where(self.converged, self.decrement, torch.zeros_like(value))


def log_joint(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    r""":math:`\log p(y_j\mid\phi_j, x_j) + \log p(\phi_j\mid\theta)`, ``(T,)``."""
    return density.log_likelihood(params, phi, x, y, mask) + density.log_prior(params, phi, x)


def newton_mode(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    precision: Tensor,
    curvature: str | CurvatureBuilder = "ggn",
    steps: int = 5,
    tolerance: float = 1e-4,
    max_halvings: int = 10,
    create_graph: bool | None = None,
) -> ModeSearch:
    r"""Damped, monotone Newton steps towards each task's mode (see the module docstring).

    Parameters
    ----------
    density, params:
        The model's per-task densities and the global values.
    phi:
        ``(T, D)`` starting points.
    x, y, mask:
        ``(T, N, ...)``, ``(T, N, ...)``, optional ``(T, N)``: the data of the log joint.
    precision:
        ``(T, D)`` diagonal prior precision :math:`P` the curvature adds.
    curvature:
        A registered curvature name or a builder.
    steps:
        The most Newton steps (``0`` evaluates the starting point only: its gradient,
        curvature and decrement).
    tolerance:
        Stop a task once its Newton decrement :math:`\tfrac12 g^\top\hat H^{-1}g` is at most
        this many nats (or within rounding of its log joint).
    max_halvings:
        How often a step that does not raise the log joint is halved before it is rejected.
    create_graph:
        Keep the iteration differentiable (meta-training); by default when gradients are on.

    Returns
    -------
    ModeSearch
        The last iterate with its log joint, gradient, curvature and decrement.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    if max_halvings < 0:
        raise ValueError(f"max_halvings must be >= 0; got {max_halvings}")
    create_graph = torch.is_grad_enabled() if create_graph is None else create_graph
    if not create_graph:
        phi = phi.detach()
        params = {k: v.detach() for k, v in params.items()}
        precision = precision.detach()
    T = phi.shape[0]
    rounding = 8 * torch.finfo(phi.dtype).eps
    stopped = torch.zeros(T, dtype=torch.bool, device=phi.device)
    history: list[Tensor] = []
    taken = 0
    while True:
        with torch.enable_grad():
            point = phi if phi.requires_grad else phi.detach().requires_grad_(True)
            value = log_joint(density, params, point, x, y, mask)
            (grad,) = torch.autograd.grad(value.sum(), point, create_graph=create_graph)
        if create_graph:
            estimate = build_curvature(
                curvature, CurvatureInputs(density, params, point, x, y, mask, precision, True)
            )
            direction = estimate.solve(grad)
        else:
            point, value, grad = point.detach(), value.detach(), grad.detach()
            with torch.no_grad():
                estimate = build_curvature(
                    curvature, CurvatureInputs(density, params, point, x, y, mask, precision, False)
                )
                direction = estimate.solve(grad)
        decrement = 0.5 * (grad * direction).sum(-1)
        current = value.detach()
        history.append(current)
        converged = decrement.detach() <= torch.clamp(rounding * (1 + current.abs()), min=tolerance)
        active = ~converged & ~stopped
        if taken == steps or not bool(active.any()):
            return ModeSearch(
                point,
                value,
                grad,
                estimate,
                decrement,
                torch.stack(history),
                taken,
                stopped,
                converged,
            )
        step = _line_search(
            density, params, point, x, y, mask, direction, current, active, max_halvings
        )
        stopped = stopped | (active & (step == 0))
        phi = point + step.unsqueeze(-1) * direction
        taken += 1


def _line_search(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
    direction: Tensor,
    current: Tensor,
    active: Tensor,
    max_halvings: int,
) -> Tensor:
    r"""Per-task step sizes :math:`\alpha` ``(T,)`` along the Newton direction.

    The largest of :math:`1, \tfrac12, \ldots, 2^{-H}` that does not lower the log joint;
    ``0`` where none does and for inactive tasks. Where the full step is accepted,
    :math:`\alpha = 2, 4, 8` are tried while each raises the log joint further: a curvature
    that overstates the Hessian (a Fisher far from the mode of a heavy-tailed likelihood) gives
    steps too short to reach the mode in a few iterations otherwise. For a quadratic log joint
    (the linear-Gaussian model) :math:`\alpha = 2` returns to the starting value and is never
    taken. Only decides (no graph); NaN trial values are rejected.
    """
    with torch.no_grad():
        base, move = phi.detach(), direction.detach()
        values = {k: v.detach() for k, v in params.items()}
        pending = active & torch.isfinite(move).all(-1)
        move = torch.where(pending.unsqueeze(-1), move, torch.zeros_like(move))

        def at(alpha: Tensor) -> Tensor:
            return log_joint(density, values, base + alpha.unsqueeze(-1) * move, x, y, mask)

        alpha = torch.ones_like(current)
        chosen = torch.zeros_like(current)
        best = current.clone()
        for _ in range(max_halvings + 1):
            trial = at(alpha)
            accept = pending & (trial >= current)
            chosen = torch.where(accept, alpha, chosen)
            best = torch.where(accept, trial, best)
            pending = pending & ~accept
            if not bool(pending.any()):
                break
            alpha = alpha / 2
        growing = chosen == 1
        for _ in range(_MAX_DOUBLINGS):
            if not bool(growing.any()):
                break
            trial = at(2 * chosen)
            better = growing & (trial > best)
            chosen = torch.where(better, 2 * chosen, chosen)
            best = torch.where(better, trial, best)
            growing = better
        return chosen
