r"""Posterior predictive distributions of new targets, per task and point.

:class:`GaussianPrediction` holds a Gaussian predictive :math:`\mathcal N(\mu, v)` per output
(a point mass with Gaussian noise, or the linearised Laplace predictive);
:class:`MixturePrediction` an equal-weight mixture of Gaussians (sampled parameters);
:class:`CategoricalPrediction` class probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = [
    "CategoricalPrediction",
    "GaussianPrediction",
    "MixturePrediction",
    "Prediction",
    "prediction_from_distribution",
]


def _normal_quantile(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(level, dtype=torch.float64)))


class Prediction:
    """Predictive distribution of targets at ``(T, N)`` points."""

    mean: Tensor

    def log_prob(self, y: Tensor) -> Tensor:
        """Log predictive density of targets ``y``, ``(T, N)``."""
        raise NotImplementedError

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        """Central ``level`` predictive interval ``(lower, upper)``, each shaped like ``mean``."""
        raise NotImplementedError

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draws of targets from the predictive, ``(num_samples, T, N, ...)``."""
        raise NotImplementedError

    def covers(self, y: Tensor, level: float) -> Tensor:
        """``(T, N)`` booleans: whether every output of ``y`` lies inside the ``level`` interval."""
        lower, upper = self.interval(level)
        inside = (y >= lower) & (y <= upper)
        return inside.reshape(*inside.shape[:2], -1).all(-1)


@dataclass
class GaussianPrediction(Prediction):
    r""":math:`y \sim \mathcal N(\mu, v)` independently per output; ``mean``, ``variance`` ``(T, N, C)``."""

    mean: Tensor
    variance: Tensor

    @property
    def scale(self) -> Tensor:
        return self.variance.sqrt()

    def log_prob(self, y: Tensor) -> Tensor:
        lp = dist.Normal(self.mean, self.scale).log_prob(y)
        return lp.reshape(*lp.shape[:2], -1).sum(-1)

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        z = _normal_quantile(level)
        return self.mean - z * self.scale, self.mean + z * self.scale

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn((num_samples, *self.mean.shape), generator=generator, dtype=self.mean.dtype)
        return self.mean + self.scale * z.to(self.mean.device)


@dataclass
class MixturePrediction(Prediction):
    r"""Equal-weight mixture :math:`\frac1S\sum_s \mathcal N(\mu_s, v_s)`.

    ``component_means`` ``(S, T, N, C)`` are network outputs at posterior draws of :math:`\phi`;
    ``noise_variance`` broadcasts against them: one variance for all draws (``(T, N, C)``), or
    one per draw (``(S, T, N, C)``, when a per-task noise scale is part of :math:`\phi`). The
    variance is :math:`\overline{v} + \mathrm{Var}_s[\mu_s]` (law of total variance).
    """

    component_means: Tensor
    noise_variance: Tensor

    @property
    def mean(self) -> Tensor:  # type: ignore[override]
        return self.component_means.mean(0)

    @property
    def variance(self) -> Tensor:
        noise = self.noise_variance.expand_as(self.component_means).mean(0)
        return self.component_means.var(0, unbiased=False) + noise

    def log_prob(self, y: Tensor) -> Tensor:
        lp = dist.Normal(self.component_means, self.noise_variance.sqrt()).log_prob(y)
        lp = lp.reshape(*lp.shape[:3], -1).sum(-1)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """A component drawn uniformly for each sample, then its Gaussian noise."""
        means = self.component_means
        pick = torch.randint(means.shape[0], (num_samples,), generator=generator).to(means.device)
        noise = self.noise_variance.expand_as(means)[pick].sqrt()
        z = torch.randn((num_samples, *means.shape[1:]), generator=generator, dtype=means.dtype)
        return means[pick] + noise * z.to(means.device)

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        """Quantiles of the mixture, by bisection on its CDF (per output)."""
        lo_p, hi_p = (1 - level) / 2, (1 + level) / 2
        return self._quantile(lo_p), self._quantile(hi_p)

    def _quantile(self, p: float) -> Tensor:
        means = self.component_means
        scale = self.noise_variance.sqrt().expand_as(means)
        low = (means - 10 * scale).min(0).values
        high = (means + 10 * scale).max(0).values
        for _ in range(60):
            mid = (low + high) / 2
            cdf = dist.Normal(means, scale).cdf(mid).mean(0)
            below = cdf < p
            low = torch.where(below, mid, low)
            high = torch.where(below, high, mid)
        return (low + high) / 2


@dataclass
class CategoricalPrediction(Prediction):
    """Class probabilities ``probs`` ``(T, N, C)``; ``mean`` is the same tensor."""

    probs: Tensor

    @property
    def mean(self) -> Tensor:  # type: ignore[override]
        return self.probs

    def log_prob(self, y: Tensor) -> Tensor:
        return (
            torch.log(self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny))
            .gather(-1, y.unsqueeze(-1))
            .squeeze(-1)
        )

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("central intervals are defined for real-valued targets only")

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Labels ``(num_samples, T, N)``."""
        flat = self.probs.reshape(-1, self.probs.shape[-1]).cpu()
        draws = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
        return draws.T.reshape(num_samples, *self.probs.shape[:-1]).to(self.probs.device)


def prediction_from_distribution(fn: dist.Distribution) -> Prediction:
    """A :class:`Prediction` from a model's observation distribution (batch ``(T, N)``)."""
    base = fn
    while isinstance(base, dist.Independent):
        base = base.base_dist
    if isinstance(base, dist.Categorical):
        return CategoricalPrediction(base.probs)
    if isinstance(base, dist.Normal):
        mean, scale = torch.broadcast_tensors(base.loc, base.scale)
        if mean.dim() == 2:
            mean, scale = mean.unsqueeze(-1), scale.unsqueeze(-1)
        return GaussianPrediction(mean, scale.square())
    raise NotImplementedError(
        f"predictions from {type(base).__name__} observations are not implemented; hierbayes "
        "handles Normal and Categorical likelihoods"
    )
