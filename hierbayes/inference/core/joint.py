r"""Each task's log joint and its exact derivatives: the one place they are formed.

For task :math:`j` with data :math:`\mathcal D_j = (x_j, y_j)` and per-task parameters
:math:`\phi_j\in\mathbb R^D`,

.. math::

    \ell_j(\phi) = \log p(y_j\mid\phi, x_j) + \log p(\phi\mid\theta),

its gradient :math:`g_j = \nabla_\phi\ell_j` and its exact Hessian
:math:`\nabla^2_\phi\ell_j`. Tasks are independent, so the gradient of :math:`\sum_j\ell_j` with
respect to the stacked :math:`\phi\in\mathbb R^{T\times D}` holds every task's own gradient, and
the Hessian of the sum is block diagonal: :func:`batched_hessian` forms all ``T`` blocks with
``D`` reverse passes batched into one call (``is_grads_batched``), not ``T·D``.

Every mode search, Laplace evidence and exact curvature of hierbayes evaluates the log joint
through :func:`log_joint`, its Hessian through :func:`batched_hessian`, and the Laplace
evidence through :func:`laplace_evidence`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hierbayes.models.density import JointDensity, TaskDensity

__all__ = ["batched_hessian", "laplace_evidence", "log_joint", "model_log_density"]

_LOG_2PI = math.log(2 * math.pi)


def log_joint(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    r""":math:`\ell_j(\phi_j) = \log p(y_j\mid\phi_j, x_j) + \log p(\phi_j\mid\theta)`, ``(T,)``.

    ``x``, ``y`` ``(T, N, ...)`` and the optional ``mask`` ``(T, N)`` are the data the joint is
    of (a support set, a query set, or both). A :class:`~hierbayes.models.density.JointDensity`
    (any Pyro program) evaluates both terms in one run."""
    if isinstance(density, JointDensity):
        return density.log_joint_parts(params, phi, x, y, mask)[0]
    return density.log_likelihood(params, phi, x, y, mask) + density.log_prior(params, phi, x)


def model_log_density(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    r"""The log density of everything, globals and per-task latents (a scalar):

    .. math::

        \log p(\theta) + \sum_j\big[\log p(\phi_j\mid\theta) + \log p(y_j\mid\phi_j, x_j)\big],

    ``phi`` ``(T, D)``, ``x``, ``y`` ``(T, N, ...)``, ``mask`` ``(T, N)``: what full-Bayes NUTS
    over the globals and every task's :math:`\phi` targets."""
    if isinstance(density, JointDensity):
        per_task, hyper = density.log_joint_parts(params, phi, x, y, mask)
        return per_task.sum() + hyper
    return log_joint(density, params, phi, x, y, mask).sum() + density.log_hyperprior(params, x)


def batched_hessian(
    function: Callable[[Tensor], Tensor], phi: Tensor, *, create_graph: bool
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(value, gradient, hessian)`` of a per-task function at ``phi`` ``(T, D)``.

    ``function`` maps ``(T, D)`` to ``(T,)`` with task ``j``'s value depending on row ``j``
    only. Returns the values ``(T,)``, the gradients ``(T, D)`` and the exact Hessians
    :math:`\nabla^2 f_j` ``(T, D, D)`` (symmetrised), from one gradient and ``D`` batched
    reverse passes over it. With ``create_graph`` all three stay differentiable (in ``phi``
    when it is part of a graph, and in whatever ``function`` closes over); otherwise they are
    detached.
    """
    T, D = phi.shape
    with torch.enable_grad():
        point = phi if (create_graph and phi.requires_grad) else phi.detach().requires_grad_(True)
        value = function(point)
        (grad,) = torch.autograd.grad(value.sum(), point, create_graph=True)
        eye = torch.eye(D, dtype=phi.dtype, device=phi.device).reshape(D, 1, D).expand(D, T, D)
        try:
            (rows,) = torch.autograd.grad(
                grad, point, grad_outputs=eye, is_grads_batched=True, create_graph=create_graph
            )
        except RuntimeError:
            # an operation without a batching rule: the same D reverse passes one at a time
            rows = torch.stack(
                [
                    torch.autograd.grad(
                        grad,
                        point,
                        grad_outputs=eye[d],
                        retain_graph=True,
                        create_graph=create_graph,
                    )[0]
                    for d in range(D)
                ]
            )
    hessian = rows.permute(1, 0, 2)
    hessian = 0.5 * (hessian + hessian.transpose(1, 2))
    if not create_graph:
        return value.detach(), grad.detach(), hessian.detach()
    return value, grad, hessian


def laplace_evidence(
    log_joint_value: Tensor, logdet: Tensor, dim: int, correction: Tensor | None = None
) -> Tensor:
    r"""The Laplace approximation of :math:`\log p(\mathcal D_j\mid\theta)`, ``(T,)``:

    .. math::

        \ell_j(\phi) - \tfrac12\log\det\hat H_j + \tfrac D2\log 2\pi\;[+\ \delta_j],

    from the log joint ``(T,)`` and the curvature's log determinant ``(T,)`` at the expansion
    point, with the one-Newton-step correction :math:`\delta_j = \tfrac12 g^\top\hat H^{-1}g`
    when given (MATH.md §4). Every Laplace evidence of hierbayes is this formula."""
    value = log_joint_value - 0.5 * logdet + 0.5 * dim * _LOG_2PI
    return value if correction is None else value + correction
