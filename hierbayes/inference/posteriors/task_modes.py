r"""Each task's mode and Hessian given the globals, and the Laplace log marginal likelihood.

The pieces of :func:`~hierbayes.inference.posteriors.hyper_laplace.hyper_laplace` that work at
one value :math:`u` of the unconstrained globals: :func:`task_modes` finds
:math:`\phi^*_j(u)` and :math:`H_j(u)` with exact Hessians, :func:`log_marginal` is

.. math::

    \mathcal L(u) = \sum_j \Big[\log p(y_j, \phi^*_j\mid u) - \tfrac12\log\det H_j
        + \tfrac D2\log 2\pi\Big] + \log p(u) + \log\lvert\det J_{u}\rvert,

exact for linear-Gaussian groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from hierbayes.errors import NumericalError
from hierbayes.inference.core.evidence import exact_hessian
from hierbayes.inference.core.mode import newton_mode
from hierbayes.inference.core.mode_report import ModeReport
from hierbayes.inference.posteriors.unconstrained import GlobalCoordinates
from hierbayes.models.density import TaskDensity

__all__ = ["TaskModes", "log_marginal", "log_marginal_at_modes", "task_modes"]


@dataclass(frozen=True)
class TaskModes:
    r"""Each task's mode :math:`\phi^*_j` ``(T, D)``, Hessian :math:`H_j` ``(T, D, D)`` and
    Laplace log evidence ``(T,)`` at given globals, with the Newton steps taken and the
    search's report (per task: converged, decrement, gradient norm)."""

    phi: Tensor
    hessian: Tensor
    log_evidence: Tensor
    steps: int
    report: ModeReport


def task_modes(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    start: Tensor | None = None,
    max_steps: int = 50,
    tolerance: float = 1e-10,
) -> TaskModes:
    r"""Every task's mode by the damped Newton search of
    :func:`~hierbayes.inference.core.mode.newton_mode` with the exact Hessian of its log
    joint (:func:`~hierbayes.inference.core.evidence.exact_hessian`), no graph.

    A task stops when its Newton decrement :math:`\tfrac12 g^\top H^{-1} g` is below
    ``tolerance``; ``start`` ``(T, D)`` defaults to the prior mean. Raises
    :class:`~hierbayes.errors.NumericalError` where :math:`H_j` is not positive definite or a
    task's Newton direction is not finite."""
    params = {k: v.detach() for k, v in params.items()}
    phi = (density.prior_mean(params, x) if start is None else start).detach()
    phi = phi.expand(x.shape[0], phi.shape[-1]).clone()
    search = newton_mode(
        density,
        params,
        phi,
        x,
        y,
        mask,
        curvature=exact_hessian,
        steps=max_steps,
        tolerance=tolerance,
        max_halvings=20,
        create_graph=False,
    )
    report = search.report()
    if report.failed_tasks:
        raise NumericalError(
            f"the Newton search for the modes of task(s) {report.failed_tasks[:5]} met a "
            "direction that is not finite: check the model or the globals"
        )
    return TaskModes(
        search.phi,
        search.curvature.to_dense(),
        search.log_evidence(newton_correction=False),
        search.steps,
        report,
    )


def log_marginal(
    u: Tensor,
    coords: GlobalCoordinates,
    fixed: Mapping[str, Tensor],
    density: TaskDensity,
    mode: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
    jacobian: bool = True,
) -> Tensor:
    r""":math:`\mathcal L(u)`, differentiable (to second order) through the task modes: two
    full Newton steps with the exact Hessian and a graph from ``mode`` (the mode at ``u``,
    detached), then the Laplace evidence there."""
    params, log_jacobian = coords.unpack(u, fixed)
    search = newton_mode(
        density,
        params,
        mode.detach(),
        x,
        y,
        mask,
        curvature=exact_hessian,
        steps=2,
        tolerance=0.0,
        create_graph=True,
        line_search=False,
    )
    evidence = search.log_evidence(newton_correction=False)
    total = evidence.sum() + density.log_hyperprior(params, x)
    return total + log_jacobian if jacobian else total


def log_marginal_at_modes(
    u: Tensor,
    coords: GlobalCoordinates,
    fixed: Mapping[str, Tensor],
    density: TaskDensity,
    modes: TaskModes,
    x: Tensor,
) -> Tensor:
    r""":math:`\mathcal L(u)` from the task modes already found at ``u`` (no graph)."""
    params, log_jacobian = coords.unpack(u, fixed)
    return modes.log_evidence.sum() + density.log_hyperprior(params, x) + log_jacobian


# -- the result --------------------------------------------------------------------------------
