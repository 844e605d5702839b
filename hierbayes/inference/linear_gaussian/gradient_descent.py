r"""Truncated gradient descent on a linear-Gaussian task: the iterate and its affine map.

:math:`k` (preconditioned) gradient steps from :math:`\phi_{(0)} = \theta` on
:math:`\ell(\phi) = \lVert y - X\phi\rVert^2/(2\sigma^2)`,

.. math::

    \phi_{(i)} = \phi_{(i-1)} + \frac{\alpha}{\sigma^2} B X^\top (y - X\phi_{(i-1)}),

are affine in :math:`\theta` and :math:`y`: :math:`\phi_{(k)} = A\theta + Cy`
(:func:`gradient_descent_affine_map`). Shapes as in :mod:`hierbayes.inference.linear_gaussian`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hierbayes.inference.linear_gaussian.linalg import (
    apply_preconditioner,
    apply_preconditioner_left,
)
from hierbayes.inference.linear_gaussian.validation import (
    Scalar,
    check_design,
    check_positive,
    check_preconditioner,
    check_steps,
    target_vector,
)

__all__ = ["AdaptationMap", "gradient_descent_affine_map", "gradient_descent_iterate"]


def gradient_descent_iterate(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> Tensor:
    r"""The iterate :math:`\phi_{(k)}` of :math:`k` (preconditioned) gradient steps from θ.

    .. math::

        \phi_{(0)} = \theta,\qquad
        \phi_{(i)} = \phi_{(i-1)} + \frac{\alpha}{\sigma^2} B X^\top (y - X\phi_{(i-1)}),

    i.e. gradient descent on :math:`\lVert y - X\phi\rVert^2/(2\sigma^2)`, or gradient ascent
    on :math:`\log\mathcal N(y \mid X\phi, \sigma^2 I)`: exactly what
    :class:`~hierbayes.inference.TruncatedGradientGuide` computes for the linear model (its
    per-parameter step sizes are :math:`\alpha B` with :math:`B` diagonal). This is the plain
    loop, with no admissibility check; it is differentiable in ``theta`` and ``step_size``.

    Parameters
    ----------
    theta:
        :math:`\theta`, ``(D,)`` or broadcasting against ``(..., D)``.
    X, y:
        ``(..., N, D)`` inputs and ``(..., N)`` or ``(..., N, 1)`` targets.
    noise_scale, step_size, steps:
        :math:`\sigma > 0`, :math:`\alpha > 0` and :math:`k \ge 0`.
    preconditioner:
        :math:`B`: ``None`` (identity), ``(D,)`` diagonal or ``(D, D)`` symmetric positive definite.

    Returns
    -------
    Tensor
        :math:`\phi_{(k)}`, ``(..., D)``.
    """
    check_design(X)
    check_steps(steps)
    check_positive(noise_scale, "noise_scale")
    check_positive(step_size, "step_size")
    check_preconditioner(preconditioner, X.shape[-1])
    t = target_vector(y, X)
    batch = torch.broadcast_shapes(theta.shape[:-1], X.shape[:-2])
    phi = theta.expand(*batch, X.shape[-1])
    inv_var = 1.0 / torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    for _ in range(steps):
        residual = t - (X @ phi.unsqueeze(-1))[..., 0]
        grad_log_lik = (X.mT @ residual.unsqueeze(-1))[..., 0] * inv_var
        phi = phi + step_size * apply_preconditioner(preconditioner, grad_log_lik)
    return phi


class AdaptationMap(NamedTuple):
    r""":math:`\phi_{(k)} = A\theta + Cy`: gradient descent as an affine map.

    ``theta_matrix`` is :math:`A = (I - \alpha B X^\top X/\sigma^2)^k`, ``(..., D, D)``;
    ``target_matrix`` is :math:`C = \sum_{i=0}^{k-1}(I - \alpha B X^\top X/\sigma^2)^i\,\alpha
    B X^\top/\sigma^2`, ``(..., D, N)``. Since :math:`\theta` is a fixed point on noise-free
    targets :math:`y = X\theta`, :math:`CX = I - A`.
    """

    theta_matrix: Tensor
    target_matrix: Tensor

    def __call__(self, theta: Tensor, y: Tensor) -> Tensor:
        r""":math:`A\theta + Cy`, ``(..., D)``, for ``theta`` ``(..., D)``, ``y`` ``(..., N)``."""
        return (self.theta_matrix @ theta.unsqueeze(-1) + self.target_matrix @ y.unsqueeze(-1))[
            ..., 0
        ]


def gradient_descent_affine_map(
    X: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> AdaptationMap:
    r"""The matrices :math:`(A, C)` with :math:`\phi_{(k)} = A\theta + Cy` (:class:`AdaptationMap`).

    Computed by the recursion :math:`A_0 = I,\ C_0 = 0,\ A_i = MA_{i-1},\ C_i = MC_{i-1} +
    \alpha BX^\top/\sigma^2` with :math:`M = I - \alpha BX^\top X/\sigma^2`. ``X`` is
    ``(..., N, D)``; the other arguments are those of :func:`gradient_descent_iterate`.
    """
    check_design(X)
    check_steps(steps)
    check_positive(noise_scale, "noise_scale")
    check_positive(step_size, "step_size")
    D = X.shape[-1]
    check_preconditioner(preconditioner, D)
    inv_var = 1.0 / torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    eye = torch.eye(D, dtype=X.dtype, device=X.device)
    BXt = step_size * inv_var * apply_preconditioner_left(preconditioner, X.mT)  # (..., D, N)
    M = eye - BXt @ X
    A = eye.expand_as(M)
    C = torch.zeros_like(BXt)
    for _ in range(steps):
        A = M @ A
        C = M @ C + BXt
    return AdaptationMap(A, C)
