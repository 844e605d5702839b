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

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hierbayes.inference.core.joint import log_joint
from hierbayes.inference.core.mode_report import ModeReport, ModeSearch
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureEstimate,
    CurvatureInputs,
    build_curvature,
)
from hierbayes.models.density import TaskDensity

__all__ = ["ModeReport", "ModeSearch", "damped_newton", "newton_mode"]

#: How often an accepted full step is doubled while the log joint keeps rising.
_MAX_DOUBLINGS = 3


#: ``evaluate(point) -> (value (T,), gradient (T, D), curvature)`` of a Newton search.
Evaluate = Callable[[Tensor], tuple[Tensor, Tensor, CurvatureEstimate]]
#: ``value_at(points) -> (T,)``: the objective at trial points, without a graph.
ValueAt = Callable[[Tensor], Tensor]


def damped_newton(
    start: Tensor,
    evaluate: Evaluate,
    value_at: ValueAt,
    *,
    steps: int,
    tolerance: float,
    max_halvings: int = 10,
    create_graph: bool = False,
    line_search: bool = True,
) -> ModeSearch:
    r"""The damped, monotone Newton iteration of the module docstring for ``T`` independent
    problems at once: maximise each row's objective from ``start`` ``(T, D)``.

    ``evaluate`` gives the objective, its gradient and a curvature estimate of its negative
    Hessian at a point (a graph kept when ``create_graph``); ``value_at`` the objective at
    trial points for the line search. The mode search of each task
    (:func:`newton_mode`) and the hyperparameter Laplace's search over the globals
    (:func:`~hierbayes.inference.posteriors.hyper_laplace.hyper_laplace`, ``T = 1``) are this
    function. A row whose Newton direction is not finite stays where it was (``failed``), as
    does a row whose every halving lowered its objective (``rejected``).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    if max_halvings < 0:
        raise ValueError(f"max_halvings must be >= 0; got {max_halvings}")
    T = start.shape[0]
    rounding = 8 * torch.finfo(start.dtype).eps
    stopped = torch.zeros(T, dtype=torch.bool, device=start.device)
    failed = torch.zeros(T, dtype=torch.bool, device=start.device)
    history: list[Tensor] = []
    taken = 0
    point = start
    while True:
        value, grad, estimate = evaluate(point)
        if create_graph:
            direction = estimate.solve(grad)
        else:
            with torch.no_grad():
                direction = estimate.solve(grad)
        finite = torch.isfinite(direction.detach()).all(-1)
        failed = failed | ~finite
        safe = torch.where(finite.unsqueeze(-1), direction, torch.zeros_like(direction))
        decrement = 0.5 * (grad * safe).sum(-1)
        current = value.detach()
        history.append(current)
        if line_search:
            converged = decrement.detach() <= torch.clamp(
                rounding * (1 + current.abs()), min=tolerance
            )
        else:
            converged = torch.full_like(finite, taken == steps)
        active = ~converged & ~stopped & ~failed
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
                converged & ~failed,
                failed,
            )
        if line_search:
            step = _line_search(value_at, point, safe, current, active, max_halvings)
            stopped = stopped | (active & (step == 0))
            # a rejected or failed row keeps its point exactly (0 * NaN would be NaN)
            point = torch.where((step > 0).unsqueeze(-1), point + step.unsqueeze(-1) * safe, point)
        else:
            point = point + safe
        taken += 1


def newton_mode(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    precision: Tensor | None = None,
    curvature: str | CurvatureBuilder = "ggn",
    steps: int = 5,
    tolerance: float = 1e-4,
    max_halvings: int = 10,
    create_graph: bool | None = None,
    line_search: bool = True,
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
        ``(T, D)`` diagonal prior precision :math:`P` the curvature adds (``None`` for a
        builder that takes the prior from the density, as
        :func:`~hierbayes.inference.core.evidence.exact_hessian` does).
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
    line_search:
        ``False`` takes exactly ``steps`` full Newton steps on every task, without tests or
        stopping: from a mode found without a graph, two such steps with a graph make the
        mode a differentiable function of the globals, exact to third order (Newton's
        quadratic convergence), as the hyperparameter Laplace needs.

    Returns
    -------
    ModeSearch
        The last iterate with its log joint, gradient, curvature and decrement
        (:func:`damped_newton`).
    """
    graph = torch.is_grad_enabled() if create_graph is None else create_graph
    if not graph:
        phi = phi.detach()
        params = {k: v.detach() for k, v in params.items()}
        precision = None if precision is None else precision.detach()
    # builders of the full joint (exact_hessian) read the prior from the density, not P
    P = torch.ones_like(phi.detach()) if precision is None else precision

    def evaluate(point: Tensor) -> tuple[Tensor, Tensor, CurvatureEstimate]:
        with torch.enable_grad():
            if not point.requires_grad:
                point = point.detach().requires_grad_(True)
            value = log_joint(density, params, point, x, y, mask)
            (grad,) = torch.autograd.grad(value.sum(), point, create_graph=graph)
        inputs = CurvatureInputs(density, params, point, x, y, mask, P, graph)
        if graph:
            return value, grad, build_curvature(curvature, inputs)
        with torch.no_grad():
            estimate = build_curvature(curvature, inputs)
        return value.detach(), grad.detach(), estimate

    frozen = {k: v.detach() for k, v in params.items()}

    def value_at(points: Tensor) -> Tensor:
        return log_joint(density, frozen, points, x, y, mask)

    return damped_newton(
        phi,
        evaluate,
        value_at,
        steps=steps,
        tolerance=tolerance,
        max_halvings=max_halvings,
        create_graph=graph,
        line_search=line_search,
    )


def _line_search(
    value_at: ValueAt,
    point: Tensor,
    direction: Tensor,
    current: Tensor,
    active: Tensor,
    max_halvings: int,
) -> Tensor:
    r"""Per-row step sizes :math:`\alpha` ``(T,)`` along the Newton direction.

    The largest of :math:`1, \tfrac12, \ldots, 2^{-H}` that does not lower the objective;
    ``0`` where none does and for inactive rows. Where the full step is accepted,
    :math:`\alpha = 2, 4, 8` are tried while each raises the objective further: a curvature
    that overstates the Hessian (a Fisher far from the mode of a heavy-tailed likelihood) gives
    steps too short to reach the mode in a few iterations otherwise. For a quadratic objective
    (the linear-Gaussian model) :math:`\alpha = 2` returns to the starting value and is never
    taken. Only decides (no graph); NaN trial values are rejected.
    """
    with torch.no_grad():
        base, move = point.detach(), direction.detach()
        pending = active.clone()

        def at(alpha: Tensor) -> Tensor:
            return value_at(base + alpha.unsqueeze(-1) * move)

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
