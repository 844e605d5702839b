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

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hierbayes.errors import NumericalError
from hierbayes.inference.posteriors.unconstrained import GlobalCoordinates
from hierbayes.models.density import TaskDensity

__all__ = ["TaskModes", "log_marginal", "log_marginal_at_modes", "task_modes"]

_LOG_2PI = math.log(2 * math.pi)


# -- each task's mode and Hessian given the globals --------------------------------------------


def _log_joint(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
) -> Tensor:
    return density.log_likelihood(params, phi, x, y, mask) + density.log_prior(params, phi, x)


def _derivatives(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(ell, g, H)``: :math:`\ell_j` ``(T,)``, its gradient ``(T, D)`` and
    :math:`H_j = -\nabla^2\ell_j` ``(T, D, D)`` (``D`` reverse passes; the tasks are independent,
    so the Hessian of the sum is block diagonal)."""
    if not phi.requires_grad:
        phi = phi.detach().requires_grad_(True)
    with torch.enable_grad():
        ell = _log_joint(density, params, phi, x, y, mask)
        (g,) = torch.autograd.grad(ell.sum(), phi, create_graph=True)
        rows = [
            torch.autograd.grad(g[:, d].sum(), phi, create_graph=create_graph, retain_graph=True)[0]
            for d in range(phi.shape[-1])
        ]
    H = -torch.stack(rows, dim=1)
    H = 0.5 * (H + H.transpose(-1, -2))
    if not create_graph:
        return ell.detach(), g.detach(), H.detach()
    return ell, g, H


def _cholesky(H: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):
        bad = [int(i) for i in (info != 0).nonzero().flatten()[:5]]
        raise NumericalError(
            f"{what} is not positive definite (task(s) {bad}): the log joint is not concave "
            "there, so it has no Laplace approximation; check the model or the globals"
        )
    return L


@dataclass(frozen=True)
class TaskModes:
    r"""Each task's mode :math:`\phi^*_j` ``(T, D)``, Hessian :math:`H_j` ``(T, D, D)`` and
    Laplace log evidence ``(T,)`` at given globals, with the Newton steps taken."""

    phi: Tensor
    hessian: Tensor
    log_evidence: Tensor
    steps: int


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
    r"""Every task's mode by damped Newton steps with the exact Hessian (no graph).

    A step that lowers a task's log joint is halved (up to 20 times); a task stops when its
    Newton decrement :math:`\tfrac12 g^\top H^{-1} g` is below ``tolerance``. ``start``
    ``(T, D)`` defaults to the prior mean. Raises
    :class:`~hierbayes.errors.NumericalError` where :math:`H_j` is not positive definite."""
    params = {k: v.detach() for k, v in params.items()}
    phi = (density.prior_mean(params, x) if start is None else start).detach().clone()
    phi = phi.expand(x.shape[0], phi.shape[-1]).clone()
    ell, g, H = _derivatives(density, params, phi, x, y, mask, create_graph=False)
    steps = 0
    for steps in range(1, max_steps + 1):
        L = _cholesky(H, "the Hessian of a task's log joint")
        direction = torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
        decrement = 0.5 * (g * direction).sum(-1)
        active = decrement > tolerance
        if not bool(active.any()):
            steps -= 1
            break
        alpha = torch.ones_like(decrement)
        for _ in range(20):
            trial = phi + (alpha * active).unsqueeze(-1) * direction
            with torch.no_grad():
                new = _log_joint(density, params, trial, x, y, mask)
            worse = active & ~(new >= ell - 1e-12 * ell.abs())
            if not bool(worse.any()):
                break
            alpha = torch.where(worse, 0.5 * alpha, alpha)
        phi = trial
        ell, g, H = _derivatives(density, params, phi, x, y, mask, create_graph=False)
    L = _cholesky(H, "the Hessian of a task's log joint at its mode")
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    D = phi.shape[-1]
    return TaskModes(phi, H, ell - 0.5 * logdet + 0.5 * D * _LOG_2PI, steps)


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
    exact Newton steps with a graph from ``mode`` (the mode at ``u``, detached)."""
    params, log_jacobian = coords.unpack(u, fixed)
    phi = mode.detach().requires_grad_(True)
    for _ in range(2):
        _, g, H = _derivatives(density, params, phi, x, y, mask, create_graph=True)
        L = _cholesky(H, "the Hessian of a task's log joint")
        phi = phi + torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
    ell, _, H = _derivatives(density, params, phi, x, y, mask, create_graph=True)
    L = _cholesky(H, "the Hessian of a task's log joint")
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    evidence = ell - 0.5 * logdet + 0.5 * phi.shape[-1] * _LOG_2PI
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
