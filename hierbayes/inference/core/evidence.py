r"""The Laplace evidence of each task, and the exact Hessian that makes it the classical one.

Around a point :math:`\phi_j` with :math:`\ell_j` the task's log joint,
:math:`g_j = \nabla_\phi\ell_j` and :math:`\hat H_j` a curvature of :math:`-\ell_j`,

.. math::

    \log p(\mathcal D_j\mid\theta) \approx \ell_j(\phi_j) - \tfrac12\log\det\hat H_j
        + \tfrac D2\log 2\pi + \tfrac12 g_j^\top\hat H_j^{-1}g_j

(MATH.md §4; Laplace 1774, MacKay 1992). At a mode :math:`g_j = 0` and this is the classical
Laplace evidence; the last term (one Newton step) makes it exact for the linear-Gaussian
model at *any* point, which matters because truncated gradient descent stops short of the
mode. :func:`laplace_log_evidence` evaluates it after up to ``mode_steps`` Newton steps of the
one mode search (:func:`~hierbayes.inference.core.mode.newton_mode`), with the one formula
(:func:`~hierbayes.inference.core.joint.laplace_evidence`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hierbayes.errors import NumericalError
from hierbayes.inference.core.joint import batched_hessian, log_joint
from hierbayes.inference.core.laplace import prior_precision
from hierbayes.inference.core.mode import ModeSearch, newton_mode
from hierbayes.inference.curvature import (
    CurvatureBuilder,
    CurvatureInputs,
    DenseCurvature,
)
from hierbayes.models.density import TaskDensity

__all__ = ["exact_hessian", "laplace_log_evidence", "laplace_search"]


def exact_hessian(inputs: CurvatureInputs) -> DenseCurvature:
    r"""The exact Hessian :math:`-\nabla^2_\phi\ell_j` of each task's negative log joint,
    prior included (:func:`~hierbayes.inference.core.joint.batched_hessian`), with no repair:
    a curvature builder for a search whose Laplace approximation must be the classical one
    (the prior precision in ``inputs`` is not used; any prior :math:`p(\phi\mid\theta)` the
    model states enters through its own log density).

    Raises
    ------
    NumericalError
        Where a task's Hessian is not positive definite (its log joint is not concave there).
    """
    density, params, x, y, mask = inputs.density, inputs.params, inputs.x, inputs.y, inputs.mask

    def joint(phi: Tensor) -> Tensor:
        return log_joint(density, params, phi, x, y, mask)

    _, _, hessian = batched_hessian(joint, inputs.phi, create_graph=inputs.create_graph)
    matrix = -hessian
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        bad = [int(i) for i in (info != 0).nonzero().flatten()[:5]]
        raise NumericalError(
            f"the Hessian of the log joint of task(s) {bad} is not positive definite: the log "
            "joint is not concave there, so it has no Laplace approximation; check the model or "
            "the globals"
        )
    return DenseCurvature(matrix, chol)


def laplace_search(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    curvature: str | CurvatureBuilder,
    precision: Tensor | None,
    mode_steps: int = 0,
    mode_tolerance: float = 1e-2,
    create_graph: bool | None = None,
) -> ModeSearch:
    r"""The mode search a Laplace evidence is evaluated at: up to ``mode_steps`` damped Newton
    steps from ``phi`` (``0``: ``phi`` itself, with its gradient and curvature)."""
    return newton_mode(
        density,
        params,
        phi,
        x,
        y,
        mask,
        precision=precision,
        curvature=curvature,
        steps=mode_steps,
        tolerance=mode_tolerance,
        create_graph=create_graph,
    )


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
    mode_steps: int = 0,
    mode_tolerance: float = 1e-2,
    create_graph: bool | None = None,
) -> Tensor:
    r"""Laplace approximation of :math:`\log p(\mathcal D_j\mid\theta)` per task, ``(T,)``.

    Parameters
    ----------
    phi:
        ``(T, D)`` expansion points (or the starts of the mode search; differentiable into
        :math:`\theta`).
    x, y, mask:
        The task data :math:`\mathcal D_j`.
    curvature:
        A registered curvature name or builder; ``"full"`` (or ``"ggn"`` for the
        linear-Gaussian model, where the two coincide) makes the result exact there, and
        :func:`exact_hessian` uses the model's own prior, whatever its form.
    precision:
        Diagonal prior precision ``(T, D)``; by default the model's.
    newton_correction:
        Add :math:`\tfrac12 g^\top\hat H^{-1} g` (see the module docstring).
    mode_steps, mode_tolerance:
        Newton steps towards the mode first (see
        :func:`~hierbayes.inference.core.mode.newton_mode`).
    """
    create_graph = torch.is_grad_enabled() if create_graph is None else create_graph
    P = precision
    if P is None and curvature is not exact_hessian:
        P = prior_precision(density, params, phi.shape[0])
    search = laplace_search(
        density,
        params,
        phi,
        x,
        y,
        mask,
        curvature=curvature,
        precision=P,
        mode_steps=mode_steps,
        mode_tolerance=mode_tolerance,
        create_graph=create_graph,
    )
    value = search.log_evidence(newton_correction=newton_correction)
    return value if create_graph else value.detach()
