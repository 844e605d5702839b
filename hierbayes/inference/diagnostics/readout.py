r"""What the evaluation reads from any task posterior: draws as chains, Gaussian moments, time.

Each reading is decided by what the posterior declares, in this order:

* :class:`~hierbayes.inference.posteriors.samples.SamplePosterior`: its own chains and their
  sample moments;
* :class:`~hierbayes.inference.posteriors.joint.JointDrawsPosterior` (integrated over the
  globals, e.g. the hyper-Laplace mixture): its own joint draws;
* :class:`~hierbayes.inference.posteriors.base.PointMassPosterior`: its value, no spread;
* :class:`~hierbayes.inference.posteriors.gaussian.GaussianTaskPosterior`: its own draws
  :math:`\mu_j + L_j z` and its stated covariance;
* :class:`~hierbayes.inference.posteriors.gaussian.CovariancePosterior` (any posterior with a
  ``covariance()``, e.g. Laplace): :math:`\mu_j + L_j z` with :math:`L_j` the Cholesky factor
  of that covariance;
* anything else: its ``sample`` and the moments of those draws.

Draws of Gaussian posteriors use common random numbers: the noise :math:`z` ``(C·S, T, D)``
comes from a generator seeded with ``seed`` on the posterior's device, so two Gaussian
posteriors with equal moments give equal draws and equal comparison rows.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from hierbayes.inference.posteriors.base import PointMassPosterior, TaskPosterior
from hierbayes.inference.posteriors.gaussian import (
    CovariancePosterior,
    GaussianTaskPosterior,
    covariance_factor,
    standard_normal,
)
from hierbayes.inference.posteriors.joint import JointDrawsPosterior
from hierbayes.inference.posteriors.samples import SamplePosterior, thinning_index

__all__ = ["TimedPosterior", "gaussian_fit", "posterior_draws", "sample_moments", "wall_time_of"]


@runtime_checkable
class TimedPosterior(Protocol):
    """A task posterior that records how many seconds it took to compute."""

    wall_time: float


def wall_time_of(posterior: TaskPosterior) -> float:
    """The posterior's recorded ``wall_time`` in seconds (NaN when it records none)."""
    if isinstance(posterior, TimedPosterior):
        return float(posterior.wall_time)
    return math.nan


def posterior_draws(
    posterior: TaskPosterior, num_chains: int, num_draws: int, *, seed: int = 0
) -> Tensor:
    r"""Draws of :math:`\phi` grouped as chains, ``(C, S, T, D)``, on the posterior's device.

    A :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` keeps its own chains,
    each thinned to ``num_draws`` evenly spaced draws (``num_chains`` is ignored). Any other
    posterior gives ``num_chains·num_draws`` independent draws (see the module docstring) from
    a generator seeded with ``seed``, cut into ``num_chains`` "chains".
    """
    if isinstance(posterior, SamplePosterior):
        index = thinning_index(posterior.num_draws, num_draws, posterior.draws.device)
        return posterior.draws[:, index]
    if isinstance(posterior, JointDrawsPosterior):
        return posterior.joint_draws(num_chains, num_draws, seed=seed)[1]
    mean = posterior.mean
    T, D = mean.shape
    n = num_chains * num_draws
    generator = torch.Generator(device=mean.device).manual_seed(seed)
    if isinstance(posterior, CovariancePosterior) and not isinstance(
        posterior, GaussianTaskPosterior
    ):
        factor = covariance_factor(posterior.covariance().to(mean))
        z = standard_normal((n, T, D), mean, generator)
        flat = mean + torch.einsum("tij,stj->sti", factor, z)
    else:
        flat = posterior.sample(n, generator=generator)
    return flat.reshape(num_chains, num_draws, T, D)


def gaussian_fit(
    posterior: TaskPosterior, draws: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    r"""Mean ``(T, D)`` and covariance ``(T, D, D)`` of a Gaussian fit to ``posterior``.

    A point mass gives ``None`` for the covariance (zero); a posterior that states its
    covariance its own moments; a
    :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` the sample moments of all
    its draws; anything else the sample moments of ``draws`` ``(..., T, D)`` (``None`` for the
    covariance when they do not vary).
    """
    if isinstance(posterior, PointMassPosterior):
        return posterior.mean, None
    if isinstance(posterior, SamplePosterior):
        return sample_moments(posterior.draws)
    if isinstance(posterior, CovariancePosterior):
        return posterior.mean, posterior.covariance()
    if draws is None:
        raise ValueError(
            f"{type(posterior).__name__} states no covariance(); pass draws for its sample moments"
        )
    mean, cov = sample_moments(draws)
    if bool((cov.diagonal(dim1=-2, dim2=-1) == 0).all()):
        return mean, None
    return mean, cov


def sample_moments(draws: Tensor) -> tuple[Tensor, Tensor]:
    r"""Sample mean ``(T, D)`` and maximum-likelihood covariance ``(T, D, D)`` over all leading
    dimensions of ``draws`` ``(..., T, D)`` (accumulated in float64)."""
    T, D = draws.shape[-2:]
    flat = draws.reshape(-1, T, D).double()
    mean = flat.mean(0)
    centred = flat - mean
    cov = torch.einsum("std,ste->tde", centred, centred) / flat.shape[0]
    return mean.to(draws.dtype), cov.to(draws.dtype)
