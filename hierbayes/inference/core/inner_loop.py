r"""Truncated gradient ascent on each task's log density: the pure inner loop of MAML.

For all tasks of a batch at once,

.. math::

    \phi_{(0)} = \mathbb E[\phi \mid \theta], \qquad
    \phi_{(k)} = \phi_{(k-1)} + \alpha \odot \nabla_\phi \log p(\mathcal D^s_j \mid \phi)\big|_{\phi_{(k-1)}}

(Finn et al. 2017, eq. 1; Grant et al. 2018, eq. 1). ``log p`` may be the support log
likelihood or the log joint :math:`\log p(\mathcal D^s_j\mid\phi) + \log p(\phi\mid\theta)`.
A per-parameter :math:`\alpha \in \mathbb R^D_{>0}` is the diagonal preconditioner of
Meta-SGD (Li et al. 2017), equivalently a learned prior covariance (MATH.md §3).

Because tasks are independent, the gradient of :math:`\sum_j \log p_j(\phi_j)` with respect to
the stacked :math:`\phi \in \mathbb R^{T\times D}` holds every task's own gradient: one autograd
call per step serves the whole plate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hierbayes.models.density import TaskDensity

__all__ = ["adapt_tasks", "gradient_steps"]


def gradient_steps(
    log_density: Callable[[Tensor], Tensor],
    phi0: Tensor,
    *,
    steps: int,
    step_size: Tensor | float,
    first_order: bool = False,
) -> Tensor:
    r"""Take ``steps`` gradient-ascent steps on ``log_density`` from ``phi0``.

    Parameters
    ----------
    log_density:
        Maps :math:`\phi` ``(T, D)`` to per-task log densities ``(T,)``; task ``j``'s value
        must depend on row ``j`` only.
    phi0:
        ``(T, D)`` starting point, usually :math:`\theta` broadcast over tasks.
    steps:
        :math:`k \ge 0`.
    step_size:
        :math:`\alpha`: a scalar, or ``(D,)`` per-parameter step sizes.
    first_order:
        Detach each inner gradient (first-order MAML): the meta-gradient then flows into
        :math:`\theta` only through :math:`\phi_{(0)}` and into :math:`\alpha` through the
        step itself.

    Returns
    -------
    Tensor
        :math:`\phi_{(k)}`, ``(T, D)``. When gradients are enabled by the caller it is a
        differentiable function of ``phi0`` and ``step_size`` (second order unless
        ``first_order``); otherwise it is detached and no graph is kept.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    outer_grad = torch.is_grad_enabled()
    create_graph = outer_grad and not first_order
    # Without outer gradients phi0 is detached: under no_grad a view of a parameter still
    # reports requires_grad=True while being outside any graph.
    phi = phi0 if outer_grad else phi0.detach()
    with torch.enable_grad():
        for _ in range(steps):
            if not outer_grad or not phi.requires_grad:
                phi = phi.detach().requires_grad_(True)
            value = log_density(phi).sum()
            (grad,) = torch.autograd.grad(value, phi, create_graph=create_graph)
            if first_order or not outer_grad:
                grad = grad.detach()
            phi = phi + step_size * grad
    return phi if outer_grad else phi.detach()


def adapt_tasks(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    steps: int,
    step_size: Tensor | float,
    first_order: bool = False,
    joint: bool = False,
) -> Tensor:
    r""":math:`\hat\phi` ``(T, D)``: ``steps`` gradient steps from the prior mean on each task's
    support data ``x`` ``(T, N, ...)``, ``y``, ``mask`` ``(T, N)``.

    The step is on :math:`\log p(y^s_j\mid\phi, x^s_j)` (MAML), or on the log joint
    :math:`\log p(y^s_j\mid\phi) + \log p(\phi\mid\theta)` when ``joint``; it starts at
    :math:`\mathbb E[\phi\mid\theta]` (``density.prior_mean``). A pure function of ``params``
    and ``step_size``: nothing is mutated, and the result is differentiable in both.
    """

    def log_density(phi: Tensor) -> Tensor:
        value = density.log_likelihood(params, phi, x, y, mask)
        if joint:
            value = value + density.log_prior(params, phi, x)
        return value

    return gradient_steps(
        log_density,
        density.prior_mean(params, x),
        steps=steps,
        step_size=step_size,
        first_order=first_order,
    )
