r"""The Gaussian prior implied by truncated gradient descent (Santos 1996; Grant et al. 2018, §3.1).

With :math:`B = LL^\top` and :math:`L^\top X^\top X L/\sigma^2 = O\,\mathrm{diag}(\lambda_i)\,O^\top`,
:math:`k` gradient steps of size :math:`\alpha` from :math:`\theta` are exactly MAP under
:math:`\mathcal N(\theta, Q)`,

.. math::

    Q = L\,O\,\mathrm{diag}(q_i)\,O^\top L^\top, \qquad
    q_i = \frac{(1-\alpha\lambda_i)^{-k} - 1}{\lambda_i}, \qquad
    q_i = k\alpha \text{ where } \lambda_i = 0,

when :math:`0 \le \alpha\lambda_i < 1` for every :math:`i` (:func:`largest_admissible_step_size`;
outside that regime :class:`InadmissibleStepSizeError`). The derivation is in
:mod:`hierbayes.inference.linear_gaussian`.

Numerically zero eigenvalues: an eigenvalue at most :math:`10\max(N, D)\,\varepsilon\,
\lambda_{\max}` (:math:`\varepsilon` the machine epsilon of ``X``'s dtype) is treated as exactly
zero, because rounding in :math:`X^\top X` and in the eigensolver makes the zero eigenvalues of a
rank-deficient ``X`` come out as tiny numbers of either sign. :math:`q(\lambda)` is continuous
at 0 (:math:`q(\lambda) = k\alpha + O(\lambda)`), so the threshold changes :math:`Q` by far less
than rounding does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hierbayes.errors import HierbayesError
from hierbayes.inference.linear_gaussian.linalg import preconditioner_factor, scaled_gram
from hierbayes.inference.linear_gaussian.validation import (
    Scalar,
    check_design,
    check_positive,
    check_preconditioner,
    check_steps,
)

__all__ = [
    "InadmissibleStepSizeError",
    "implied_prior_covariance",
    "implied_prior_precision",
    "largest_admissible_step_size",
]


class InadmissibleStepSizeError(HierbayesError, ValueError):
    r"""A step size with :math:`\alpha\lambda_{\max} \ge 1`, outside the theorem's regime.

    There the :math:`k`-step iterate is no longer MAP under the implied prior of Santos (1996);
    for odd :math:`k`, :math:`\alpha\lambda = 1` or :math:`\alpha\lambda \ge 2` it is MAP
    under no Gaussian prior centred at :math:`\theta` at all.

    Attributes
    ----------
    step_size:
        The :math:`\alpha` that was passed.
    largest_eigenvalue:
        :math:`\lambda_{\max}` of :math:`L^\top X^\top X L/\sigma^2` (over all tasks).
    largest_admissible_step_size:
        :math:`1/\lambda_{\max}`; every smaller positive step size is admissible.
    task:
        The (flattened) index of the first offending task, or ``None`` for unbatched ``X``.
    """

    def __init__(
        self,
        message: str,
        *,
        step_size: float,
        largest_eigenvalue: float,
        largest_admissible_step_size: float,
        task: int | None,
    ) -> None:
        super().__init__(message)
        self.step_size = step_size
        self.largest_eigenvalue = largest_eigenvalue
        self.largest_admissible_step_size = largest_admissible_step_size
        self.task = task


class _Spectrum(NamedTuple):
    eigenvalues: Tensor  # (..., D), thresholded: exactly 0 where numerically zero
    eigenvectors: Tensor  # (..., D, D)
    factor: Tensor | None  # L with B = L L^T: None, (D,) or (D, D) lower triangular


def _spectrum(X: Tensor, noise_scale: Scalar, preconditioner: Tensor | None) -> _Spectrum:
    r"""Eigenpairs of :math:`L^\top X^\top X L/\sigma^2`, numerically-zero eigenvalues set to 0.

    An eigenvalue is treated as exactly zero when it is at most
    :math:`10\max(N, D)\,\varepsilon\,\lambda_{\max}` (:math:`\varepsilon` the machine epsilon
    of ``X``'s dtype): rounding in :math:`X^\top X` and in the eigensolver makes the zero
    eigenvalues of a rank-deficient ``X`` come out as tiny numbers of either sign. Because
    :math:`q(\lambda)` is continuous at 0 (:math:`q(\lambda) = k\alpha + O(\lambda)`), the
    choice of threshold changes :math:`Q` by far less than rounding does.
    """
    check_design(X)
    check_positive(noise_scale, "noise_scale")
    N, D = X.shape[-2], X.shape[-1]
    check_preconditioner(preconditioner, D)
    L = preconditioner_factor(preconditioner)
    G = scaled_gram(X, noise_scale)
    if L is not None:
        G = L[:, None] * G * L[None, :] if L.dim() == 1 else L.mT @ G @ L
        G = 0.5 * (G + G.mT)
    lam, O = torch.linalg.eigh(G)
    eps = torch.finfo(X.dtype).eps
    top = lam[..., -1:].clamp_min(0.0)
    lam = torch.where(lam <= 10 * max(N, D) * eps * top, torch.zeros_like(lam), lam)
    return _Spectrum(lam, O, L)


def largest_admissible_step_size(
    X: Tensor, *, noise_scale: Scalar, preconditioner: Tensor | None = None
) -> Tensor:
    r""":math:`1/\lambda_{\max}` per task, ``(...)``: every smaller step size implies a prior.

    :math:`\lambda_{\max}` is the largest eigenvalue of :math:`L^\top X^\top X L/\sigma^2`
    (:math:`B = LL^\top`); it is ``inf`` for ``X = 0``. Gradient descent on the task's loss
    converges for :math:`\alpha < 2/\lambda_{\max}`, but it is MAP under a Gaussian prior
    centred at :math:`\theta` (for every :math:`k`) only for :math:`\alpha < 1/\lambda_{\max}`.
    """
    lam = _spectrum(X, noise_scale, preconditioner).eigenvalues[..., -1]
    return torch.where(lam > 0, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), math.inf)


def _check_admissible(lam: Tensor, step_size: Scalar, steps: int) -> None:
    alpha = float(torch.as_tensor(step_size).detach())
    top = lam[..., -1]
    bad = (alpha * top) >= 1
    if not bool(bad.any()):
        return
    lam_max = float(top.max())
    task = int(bad.reshape(-1).nonzero()[0]) if top.dim() > 0 else None
    where = f" (task {task} is the first such)" if task is not None else ""
    bound = 1.0 / lam_max
    raise InadmissibleStepSizeError(
        f"step_size α = {alpha:.6g} is too large for these inputs{where}: the largest "
        f"eigenvalue of B^(1/2) X^T X B^(1/2) / σ² is λ_max = {lam_max:.6g}, so "
        f"αλ_max = {alpha * lam_max:.6g} ≥ 1. Along that eigenvector gradient descent reaches "
        f"or overshoots the least-squares solution, and its {steps}-step iterate no longer "
        "corresponds to the Gaussian prior N(θ, Q) of Santos (1996), which needs αλ < 1: for "
        "odd k, αλ = 1 or αλ ≥ 2 it is the MAP under no Gaussian prior centred at θ at all "
        "(for even k and 1 < αλ < 2 it matches only the prior of the mirrored step "
        "(2 - αλ)/λ, which is not reported). Use step_size < 1/λ_max = "
        f"{bound:.6g}{' (over all tasks)' if task is not None else ''}.",
        step_size=alpha,
        largest_eigenvalue=lam_max,
        largest_admissible_step_size=bound,
        task=task,
    )


def _implied_variances(lam: Tensor, step_size: Scalar, steps: int) -> Tensor:
    r""":math:`q_i = ((1-\alpha\lambda_i)^{-k} - 1)/\lambda_i`, and :math:`k\alpha` where 0.

    Written as :math:`\operatorname{expm1}(-k\operatorname{log1p}(-\alpha\lambda))/\lambda`, which
    has no cancellation for small :math:`\alpha\lambda`.
    """
    zero = lam == 0
    safe = torch.where(zero, torch.ones_like(lam), lam)
    alpha = torch.as_tensor(step_size, dtype=lam.dtype, device=lam.device)
    q = torch.expm1(-steps * torch.log1p(-alpha * safe)) / safe
    return torch.where(zero, steps * alpha * torch.ones_like(lam), q)


def implied_prior_covariance(
    X: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> Tensor:
    r"""The covariance :math:`Q` of the Gaussian prior :math:`\mathcal N(\theta, Q)` under which
    :math:`k` gradient-descent steps from :math:`\theta` are exactly MAP.

    .. math::

        L^\top X^\top X L/\sigma^2 = O\,\mathrm{diag}(\lambda_i)\,O^\top,\qquad
        Q = L\,O\,\mathrm{diag}(q_i)\,O^\top L^\top,\qquad
        q_i = \frac{(1-\alpha\lambda_i)^{-k}-1}{\lambda_i}
        \ \ (q_i = k\alpha \text{ if } \lambda_i = 0),

    where :math:`B = LL^\top` is the preconditioner (Santos 1996; Grant et al. 2018, §3.1;
    MATH.md §3). Directions the task's data cannot see (:math:`\lambda_i = 0`) keep the prior
    variance :math:`k\alpha` (times :math:`B`); eigenvalues below a relative threshold
    (:math:`10\max(N,D)\varepsilon\lambda_{\max}`) count as zero (see the module notes).
    ``steps = 0`` gives :math:`Q = 0`: the prior is a point mass at :math:`\theta`.

    Parameters
    ----------
    X:
        The task's inputs, ``(..., N, D)``; one :math:`Q` per task.
    noise_scale, step_size, steps, preconditioner:
        :math:`\sigma`, :math:`\alpha`, :math:`k` and :math:`B`, as in
        :func:`gradient_descent_iterate`.

    Returns
    -------
    Tensor
        :math:`Q`, ``(..., D, D)``, symmetric positive definite for :math:`k \ge 1`.

    Raises
    ------
    InadmissibleStepSizeError
        If :math:`\alpha\lambda_i \ge 1` for some eigenvalue of some task; the message gives
        :math:`\lambda_{\max}` and the largest admissible step size :math:`1/\lambda_{\max}`.
    """
    check_steps(steps)
    check_positive(step_size, "step_size")
    spec = _spectrum(X, noise_scale, preconditioner)
    _check_admissible(spec.eigenvalues, step_size, steps)
    q = _implied_variances(spec.eigenvalues, step_size, steps)
    O, L = spec.eigenvectors, spec.factor
    if L is not None:
        O = L[:, None] * O if L.dim() == 1 else L @ O
    Q = (O * q.unsqueeze(-2)) @ O.mT
    return 0.5 * (Q + Q.mT)


def implied_prior_precision(
    X: Tensor,
    *,
    noise_scale: Scalar,
    step_size: Scalar,
    steps: int,
    preconditioner: Tensor | None = None,
) -> Tensor:
    r""":math:`Q^{-1}`, the precision of the implied prior (see :func:`implied_prior_covariance`).

    .. math::

        Q^{-1} = L^{-\top} O\,\mathrm{diag}(\gamma_i)\,O^\top L^{-1},\qquad
        \gamma_i = \frac{\lambda_i(1-\alpha\lambda_i)^k}{1-(1-\alpha\lambda_i)^k}
                 = \frac{1}{q_i}\ \ (\gamma_i = 1/(k\alpha) \text{ if } \lambda_i = 0).

    Better conditioned than :math:`Q` itself: :math:`\gamma_i` is small where :math:`q_i` is
    huge (:math:`\alpha\lambda_i` near 1, many steps), and the posterior precision
    :math:`H = X^\top X/\sigma^2 + Q^{-1}` has eigenvalues :math:`\lambda_i + \gamma_i =
    \lambda_i/(1-(1-\alpha\lambda_i)^k)`, between :math:`1/(k\alpha)` and
    :math:`\lambda_{\max}/(1-(1-\alpha\lambda_{\max})^k)` in the whitened coordinates: a
    condition number of at most :math:`k` (times that of :math:`B`). Needs :math:`k \ge 1`.
    Shapes and errors as in :func:`implied_prior_covariance`.
    """
    check_steps(steps)
    if steps == 0:
        raise ValueError(
            "steps = 0 implies the point-mass prior at θ (Q = 0), which has no precision; "
            "use implied_prior_covariance, which returns Q = 0"
        )
    check_positive(step_size, "step_size")
    spec = _spectrum(X, noise_scale, preconditioner)
    _check_admissible(spec.eigenvalues, step_size, steps)
    gamma = 1.0 / _implied_variances(spec.eigenvalues, step_size, steps)
    W, L = spec.eigenvectors, spec.factor
    if L is not None:
        if L.dim() == 1:
            W = W / L[:, None]
        else:
            W = torch.linalg.solve_triangular(L.mT.expand(*W.shape), W, upper=True)
    P = (W * gamma.unsqueeze(-2)) @ W.mT
    return 0.5 * (P + P.mT)
