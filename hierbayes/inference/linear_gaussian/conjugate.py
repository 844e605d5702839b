r"""The conjugate closed forms under a Gaussian prior :math:`\phi \sim \mathcal N(\theta, Q)`.

The evidence (:func:`log_evidence`) and the task posterior (:func:`posterior`):

.. math::

    p(y \mid \theta) &= \mathcal N(y;\, X\theta,\, \sigma^2 I + X Q X^\top),\\
    p(\phi \mid y, \theta) &= \mathcal N(\mu, H^{-1}),\quad
        H = X^\top X/\sigma^2 + Q^{-1},\quad
        \mu = H^{-1}(X^\top y/\sigma^2 + Q^{-1}\theta).

Under the prior implied by :math:`k` gradient steps
(:func:`~hierbayes.inference.linear_gaussian.implied_prior_covariance`),
:math:`\mu = \phi_{(k)}`. Shapes as in :mod:`hierbayes.inference.linear_gaussian`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hierbayes.inference.linear_gaussian.linalg import cholesky, scaled_gram
from hierbayes.inference.linear_gaussian.validation import (
    Scalar,
    check_design,
    check_positive,
    target_vector,
)

__all__ = ["LinearGaussianPosterior", "log_evidence", "posterior"]

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class LinearGaussianPosterior:
    r"""The Gaussian task posterior :math:`\mathcal N(\mu, \Sigma)` of :func:`posterior`.

    ``mean`` is :math:`\mu` ``(..., D)``, ``covariance`` :math:`\Sigma = H^{-1}` ``(..., D, D)``.
    ``precision`` is :math:`H = X^\top X/\sigma^2 + Q^{-1}`: kept from the information form
    (``_precision``), or computed on use from a covariance (it needs :math:`\Sigma`
    non-singular).
    """

    mean: Tensor
    covariance: Tensor
    _precision: Tensor | None = None

    @property
    def precision(self) -> Tensor:
        r""":math:`H = \Sigma^{-1}`, ``(..., D, D)``."""
        if self._precision is not None:
            return self._precision
        L = cholesky(
            self.covariance, "the posterior covariance (from a singular prior covariance?)"
        )
        return torch.cholesky_inverse(L)


def posterior(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    noise_scale: Scalar,
    prior_covariance: Tensor | None = None,
    prior_precision: Tensor | None = None,
) -> LinearGaussianPosterior:
    r"""The exact task posterior :math:`p(\phi\mid y,\theta)` under a Gaussian prior.

    .. math::

        H = X^\top X/\sigma^2 + Q^{-1},\qquad
        \mu = H^{-1}\bigl(X^\top y/\sigma^2 + Q^{-1}\theta\bigr)
            = \theta + QX^\top(\sigma^2 I + XQX^\top)^{-1}(y - X\theta),\qquad
        \Sigma = H^{-1} = Q - QX^\top(\sigma^2 I + XQX^\top)^{-1}XQ.

    :math:`\mu` is the MAP estimate; under the implied prior of :math:`k` gradient-descent steps
    (:func:`implied_prior_covariance`) it equals :func:`gradient_descent_iterate`.

    Give exactly one of ``prior_covariance`` (the second, "Kalman" forms above: an
    :math:`N\times N` Cholesky factorisation; :math:`Q` may be singular) or ``prior_precision``
    (the first, "information" form: a :math:`D\times D` Cholesky factorisation of :math:`H`).
    Prefer the precision for implied priors with :math:`\alpha\lambda_{\max}` near 1 and many
    steps: their variances span :math:`k\alpha` to about
    :math:`(1-\alpha\lambda_{\max})^{-k}/\lambda_{\max}`, forming :math:`Q` already rounds
    its small directions by :math:`\varepsilon\lVert Q\rVert`, and the covariance form is
    then only accurate to about :math:`\varepsilon(1-\alpha\lambda_{\max})^{-k}`, while the
    information form stays at rounding level (see :func:`implied_prior_precision`).

    Parameters
    ----------
    theta:
        Prior mean, ``(D,)`` or broadcasting against ``(..., D)``.
    X, y:
        ``(..., N, D)`` and ``(..., N)`` or ``(..., N, 1)``.
    noise_scale:
        :math:`\sigma`.
    prior_covariance, prior_precision:
        :math:`Q` or :math:`Q^{-1}`, ``(D, D)`` or ``(..., D, D)``.
    """
    check_design(X)
    check_positive(noise_scale, "noise_scale")
    if (prior_covariance is None) == (prior_precision is None):
        raise ValueError("give exactly one of prior_covariance and prior_precision")
    t = target_vector(y, X)
    sigma2 = torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    if prior_precision is not None:
        H = scaled_gram(X, noise_scale) + prior_precision
        L = cholesky(H, "the posterior precision X^T X/σ² + Q^(-1)")
        rhs = (X.mT @ t.unsqueeze(-1))[..., 0] / sigma2 + (prior_precision @ theta.unsqueeze(-1))[
            ..., 0
        ]
        batch = torch.broadcast_shapes(L.shape[:-2], rhs.shape[:-1])
        mean = torch.cholesky_solve(rhs.expand(*batch, rhs.shape[-1]).unsqueeze(-1), L)[..., 0]
        return LinearGaussianPosterior(mean, torch.cholesky_inverse(L), H)
    assert prior_covariance is not None
    Q = prior_covariance
    XQ = X @ Q  # (..., N, D)
    S = XQ @ X.mT
    S = 0.5 * (S + S.mT) + sigma2 * torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    L = cholesky(S, "the marginal covariance σ²I + XQX^T")
    residual = t - (X @ theta.unsqueeze(-1))[..., 0]
    # K^T = S^{-1} X Q, so mean = θ + K r and Σ = Q - K X Q.
    Kt = torch.cholesky_solve(XQ, L)  # (..., N, D)
    mean = theta + (Kt.mT @ residual.unsqueeze(-1))[..., 0]
    cov = Q - XQ.mT @ Kt
    return LinearGaussianPosterior(mean, 0.5 * (cov + cov.mT))


def log_evidence(
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    *,
    noise_scale: Scalar,
    prior_covariance: Tensor,
) -> Tensor:
    r"""The log marginal likelihood :math:`\log p(y \mid \theta)` of each task.

    .. math::

        \log p(y\mid\theta) = \log\int\mathcal N(y; X\phi, \sigma^2 I)\,
            \mathcal N(\phi;\theta, Q)\,d\phi
          = \log\mathcal N(y;\, X\theta,\, S),\qquad S = \sigma^2 I + XQX^\top,

    evaluated as :math:`-\tfrac12\lVert L^{-1}(y - X\theta)\rVert^2 - \sum_n\log L_{nn}
    - \tfrac N2\log 2\pi` with the Cholesky factor :math:`S = LL^\top`. This is the quantity
    empirical Bayes maximises over :math:`\theta` (Grant et al. 2018, eq. 2); it is
    differentiable in ``theta``, ``prior_covariance`` and ``noise_scale``.

    Parameters
    ----------
    theta:
        ``(D,)`` or broadcasting against ``(..., D)``.
    X, y:
        ``(..., N, D)`` and ``(..., N)`` or ``(..., N, 1)``.
    noise_scale:
        :math:`\sigma`.
    prior_covariance:
        :math:`Q`, ``(D, D)`` or ``(..., D, D)``, symmetric positive semi-definite.

    Returns
    -------
    Tensor
        ``(...)``, one log evidence per task.
    """
    check_design(X)
    check_positive(noise_scale, "noise_scale")
    t = target_vector(y, X)
    N = X.shape[-2]
    sigma2 = torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2
    S = X @ prior_covariance @ X.mT
    S = 0.5 * (S + S.mT) + sigma2 * torch.eye(N, dtype=X.dtype, device=X.device)
    L = cholesky(S, "the marginal covariance σ²I + XQX^T")
    residual = t - (X @ theta.unsqueeze(-1))[..., 0]
    batch = torch.broadcast_shapes(L.shape[:-2], residual.shape[:-1])
    z = torch.linalg.solve_triangular(
        L.expand(*batch, N, N), residual.expand(*batch, N).unsqueeze(-1), upper=False
    )[..., 0]
    half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * z.square().sum(-1) - half_logdet - 0.5 * N * _LOG_2PI
