r"""Each method's county intercepts and hyperparameters as plain numbers.

Three summaries of a county intercept :math:`\alpha_j` (``(T,)`` tensors ``mean``, ``sd``,
``q05``, ``q95``), one per kind of posterior:

* a Gaussian :math:`\mathcal N(m_j, s_j^2)` (empirical Bayes' Laplace posterior, exact for these
  linear-Gaussian counties): :math:`q_{05}, q_{95} = m_j \mp z_{0.95}\, s_j`;
* a mixture :math:`\sum_k w_k \mathcal N(m_{jk}, s_{jk}^2)` (hyper-Laplace): its mean and sd by
  the laws of total expectation and variance, its quantiles by bisection of the mixture's CDF
  :math:`F_j(a) = \sum_k w_k \Phi\big((a - m_{jk})/s_{jk}\big)` (:func:`mixture_quantiles`);
* draws (NUTS): the sample mean, sd and empirical quantiles over every chain's draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hierbayes.experiments.radon.config import HYPERPARAMETERS
from hierbayes.inference.posteriors import HyperLaplacePosterior, TaskPosterior
from hierbayes.inference.references import FullBayesPosterior

__all__ = [
    "Z95",
    "draws_summary",
    "finite_or_none",
    "gaussian_summary",
    "hyper_from_draws",
    "hyper_point",
    "mixture_quantiles",
    "mixture_summary",
]

#: :math:`\Phi^{-1}(0.95)`: a Gaussian's 5 % and 95 % quantiles lie this many sds from its mean.
Z95 = 1.6448536269514722
#: Bisection steps of :func:`mixture_quantiles` (each halves the bracket).
_BISECTIONS = 100


def gaussian_summary(posterior: TaskPosterior) -> dict[str, Tensor]:
    r"""``mean``, ``sd``, ``q05``, ``q95`` ``(T,)`` of a one-dimensional Gaussian task posterior
    (``mean`` ``(T, 1)``): :math:`m_j`, :math:`s_j` and :math:`m_j \mp z_{0.95} s_j`."""
    _check_scalar(posterior.mean, "the empirical-Bayes posterior")
    mean, sd = posterior.mean[:, 0].detach(), posterior.sd[:, 0].detach()
    return {"mean": mean, "sd": sd, "q05": mean - Z95 * sd, "q95": mean + Z95 * sd}


def mixture_quantiles(
    weights: Tensor, means: Tensor, sds: Tensor, probabilities: Sequence[float]
) -> Tensor:
    r"""Quantiles ``(P, T)`` of :math:`T` mixtures :math:`\sum_k w_k\mathcal N(m_{kj}, s_{kj}^2)`.

    Bisection of :math:`F_j(a) = \sum_k w_k \Phi((a - m_{kj})/s_{kj})`, which increases, from
    the bracket :math:`[\min_k m_{kj} - 40 s_{kj}, \max_k m_{kj} + 40 s_{kj}]`; 100 halvings
    leave it at rounding in float64.

    Parameters
    ----------
    weights:
        ``(K,)`` non-negative, summing to one.
    means, sds:
        ``(K, T)``; ``sds`` positive.
    probabilities:
        The levels, each in (0, 1).
    """
    if means.shape != sds.shape or means.dim() != 2 or weights.shape != means.shape[:1]:
        raise ValueError(
            f"mixture_quantiles needs weights (K,) and means, sds (K, T); got "
            f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(sds.shape)}"
        )
    if not all(0.0 < p < 1.0 for p in probabilities):
        raise ValueError(f"probabilities must lie in (0, 1); got {list(probabilities)}")
    if not bool((sds > 0).all()):
        raise ValueError("mixture_quantiles needs positive component sds")
    levels = torch.tensor(list(probabilities), dtype=means.dtype, device=means.device)
    lower = (means - 40 * sds).amin(0).expand(len(levels), -1).clone()
    upper = (means + 40 * sds).amax(0).expand(len(levels), -1).clone()
    w = weights.to(means)[:, None]
    for _ in range(_BISECTIONS):
        middle = 0.5 * (lower + upper)  # (P, T)
        cdf = (w * torch.special.ndtr((middle[:, None, :] - means) / sds)).sum(1)  # (P, T)
        below = cdf < levels[:, None]
        lower = torch.where(below, middle, lower)
        upper = torch.where(below, upper, middle)
    return 0.5 * (lower + upper)


def mixture_summary(posterior: HyperLaplacePosterior) -> dict[str, Tensor]:
    r"""``mean``, ``sd``, ``q05``, ``q95`` ``(T,)`` of hyper-Laplace's one-dimensional task
    posteriors: the mixture's mean and sd, and its quantiles (:func:`mixture_quantiles`)."""
    _check_scalar(posterior.mean, "the hyper-Laplace posterior")
    means = posterior.component_means[..., 0]  # (K, T)
    sds = posterior.component_covariances[..., 0, 0].sqrt()
    q05, q95 = mixture_quantiles(posterior.weights, means, sds, (0.05, 0.95))
    return {"mean": posterior.mean[:, 0], "sd": posterior.sd[:, 0], "q05": q05, "q95": q95}


def draws_summary(posterior: FullBayesPosterior) -> dict[str, Tensor]:
    r"""``mean``, ``sd``, ``q05``, ``q95`` ``(T,)`` over all chains' draws ``(C, S, T, 1)``."""
    _check_scalar(posterior.draws[0, 0], "the NUTS draws")
    flat = posterior.draws[..., 0].reshape(-1, posterior.draws.shape[2]).double()
    q05, q95 = flat.quantile(torch.tensor([0.05, 0.95], dtype=flat.dtype), dim=0)
    return {"mean": flat.mean(0), "sd": flat.std(0), "q05": q05, "q95": q95}


def hyper_point(params: Mapping[str, Tensor]) -> dict[str, Any]:
    """The hyperparameters (:data:`HYPERPARAMETERS`) at one value of the globals: a number each,
    a list of three for ``weights``."""
    return {key: _plain(params[site]) for key, site in HYPERPARAMETERS.items()}


def hyper_from_draws(draws: Mapping[str, Tensor], weights: Tensor | None = None) -> dict[str, Any]:
    r"""Posterior ``mean`` and ``sd`` of each hyperparameter over weighted draws of the globals.

    ``draws`` holds each site's draws with the draws first (``(K, *site_shape)``, or
    ``(C, S, *site_shape)`` with ``weights`` ``None``: equal weights over chains and draws);
    with ``weights`` ``(K,)`` (summing to one) the mean is :math:`\sum_k w_k\theta_k` and the
    sd :math:`\big(\sum_k w_k(\theta_k - \bar\theta)^2\big)^{1/2}`.
    """
    out: dict[str, Any] = {}
    for key, site in HYPERPARAMETERS.items():
        value = draws[site].double()
        if weights is None:
            flat = value.reshape(-1, *value.shape[2:])
            mean, sd = flat.mean(0), flat.std(0)
        else:
            w = weights.double().reshape(-1, *([1] * (value.dim() - 1)))
            mean = (w * value).sum(0)
            sd = (w * (value - mean).square()).sum(0).sqrt()
        out[key] = {"mean": _plain(mean), "sd": _plain(sd)}
    return out


def _plain(value: Tensor) -> float | list[float]:
    flat = value.detach().double().cpu()
    return float(flat) if flat.dim() == 0 else [float(v) for v in flat.flatten()]


def _check_scalar(mean: Tensor, what: str) -> None:
    if mean.shape[-1] != 1:
        raise ValueError(
            f"{what} has {mean.shape[-1]} parameters a county; the radon summaries read one "
            "(the county intercept alpha_j of ContextualEffects)"
        )


def finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` where it is NaN or infinite (JSON has no NaN)."""
    return value if math.isfinite(value) else None
