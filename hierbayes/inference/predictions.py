r"""Posterior predictive distributions of new targets, per task and point.

:class:`GaussianPrediction` holds a Gaussian predictive :math:`\mathcal N(\mu, v)` per output
(a point mass with Gaussian noise, or the linearised Laplace predictive);
:class:`MixturePrediction` an equal-weight mixture of Gaussians (sampled parameters);
:class:`CategoricalPrediction` class probabilities; :class:`DrawsPrediction` any other
observation distribution of the model, as an equal-weight mixture over posterior draws of
:math:`\phi` (as ``pyro.infer.Predictive`` draws :math:`\phi^{(s)}` from the posterior, then
:math:`y` from :math:`p(y\mid\phi^{(s)}, x)`):

.. math::

    q(y\mid x) = \frac1S\sum_{s=1}^S p(y\mid\phi^{(s)}, x), \qquad
    \log q(y\mid x) = \operatorname{logsumexp}_s \log p(y\mid\phi^{(s)}, x) - \log S,

with the mean and variance by the laws of total expectation and variance and central intervals
from the mixture's draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.errors import TaskDataError

__all__ = [
    "CategoricalPrediction",
    "DrawsPrediction",
    "GaussianPrediction",
    "MixturePrediction",
    "Prediction",
    "mixture_from_distribution",
    "prediction_from_distribution",
]


def _normal_quantile(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(level, dtype=torch.float64)))


def as_targets(y: Tensor, like: Tensor | torch.Size | tuple[int, ...]) -> Tensor:
    """``y`` laid out like the predictive's values ``like`` (a tensor or its shape).

    A program observes its targets in its own layout: ``obs=y[..., 0]`` scores ``(T, N)``
    values of targets given as ``(T, N, 1)``, and a network model's outputs are ``(T, N, C)``
    for targets given as ``(T, N)``. Targets with the same tasks, points and number of values
    as the predictive are reshaped to its layout, so that they never broadcast against it (a
    ``(T, N, 1)`` target against ``(T, N)`` values would silently make ``(T, N, N)``).

    Raises
    ------
    TaskDataError
        When ``y`` holds another number of values per point than the predictive.
    """
    shape = tuple(like.shape if isinstance(like, Tensor) else like)
    if tuple(y.shape) == shape:
        return y
    if y.dim() >= 2 and tuple(y.shape[:2]) == shape[:2] and y.numel() == math.prod(shape):
        return y.reshape(shape)
    raise TaskDataError(
        f"targets of shape {tuple(y.shape)} do not fit the predictive, whose values have shape "
        f"{shape} (tasks, points, ...): give the targets as the model observes them"
    )


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
        y = as_targets(y, lower)
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
        lp = dist.Normal(self.mean, self.scale).log_prob(as_targets(y, self.mean))
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
        y = as_targets(y, self.component_means[0])
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
        labels = as_targets(y, self.probs.shape[:-1]).long()
        return (
            torch.log(self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny))
            .gather(-1, labels.unsqueeze(-1))
            .squeeze(-1)
        )

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("central intervals are defined for real-valued targets only")

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Labels ``(num_samples, T, N)``."""
        flat = self.probs.reshape(-1, self.probs.shape[-1]).cpu()
        draws = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
        return draws.T.reshape(num_samples, *self.probs.shape[:-1]).to(self.probs.device)


def _seeded_draws(
    fn: dist.Distribution, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    """``fn.sample(shape)`` from a seed taken off ``generator`` (Pyro's samplers take none),
    leaving the global random state as it was; the global state draws when it is ``None``."""
    if generator is None:
        with torch.no_grad():
            return fn.sample(shape)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return fn.sample(shape)


@dataclass
class DrawsPrediction(Prediction):
    r"""Equal-weight mixture :math:`\frac1S\sum_s p(y\mid\phi^{(s)}, x)` of the model's own
    observation distribution, for any distribution (Bernoulli, Poisson, StudentT, ...).

    ``components`` has batch shape ``(S * T, N)`` (draw-major: the model evaluated at ``S``
    draws of :math:`\phi` for ``T`` tasks at once), or ``(T, N)`` with ``num_components = 1``
    (a point mass). Intervals are empirical quantiles of ``num_draws`` draws from the mixture
    (``seed``: the same intervals each call), the lower one rounded down and the upper one up,
    so that a discrete predictive's interval holds at least ``level`` of its mass.
    """

    components: dist.Distribution
    num_components: int = 1
    num_draws: int = 2000
    seed: int = 0
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def _split(self, value: Tensor) -> Tensor:
        """``(S * T, N, ...)`` to ``(S, T, N, ...)``."""
        S = self.num_components
        return value.reshape(S, value.shape[0] // S, *value.shape[1:])

    @property
    def binary(self) -> bool:
        """Targets are 0/1 labels (a Bernoulli observation)."""
        base: Any = self.components
        while isinstance(base, (dist.Independent, dist.MaskedDistribution)):
            base = base.base_dist
        return isinstance(base, dist.Bernoulli)

    def _moments(self) -> tuple[Tensor, Tensor]:
        if "mean" not in self._cache:
            try:
                components: Any = self.components
                means = self._split(components.mean)
                variances = self._split(components.variance)
                finite = bool(torch.isfinite(means).all() and torch.isfinite(variances).all())
            except NotImplementedError:
                finite = False
            if finite:
                self._cache["mean"] = means.mean(0)
                self._cache["variance"] = variances.mean(0) + means.var(0, unbiased=False)
            else:  # e.g. StudentT with df <= 2: moments of the draws
                draws = self._draws()
                self._cache["mean"] = draws.mean(0)
                self._cache["variance"] = draws.var(0, unbiased=False)
        return self._cache["mean"], self._cache["variance"]

    @property
    def mean(self) -> Tensor:  # type: ignore[override]
        r""":math:`\frac1S\sum_s \mathbb E[y\mid\phi^{(s)}]`, ``(T, N, ...)``."""
        return self._moments()[0]

    @property
    def variance(self) -> Tensor:
        r"""Mean of the components' variances plus the variance of their means."""
        return self._moments()[1]

    @property
    def value_shape(self) -> tuple[int, ...]:
        """The shape of one draw of targets for all tasks, ``(T, N, ...)``, as the model's
        observation site lays them out."""
        components: Any = self.components
        shape = (*components.batch_shape, *components.event_shape)
        return (shape[0] // self.num_components, *shape[1:])

    def log_prob(self, y: Tensor) -> Tensor:
        S = self.num_components
        y = as_targets(y, self.value_shape)
        target = y.unsqueeze(0).expand(S, *y.shape).reshape(-1, *y.shape[1:])
        lp = self._split(self.components.log_prob(target))
        lp = lp.reshape(*lp.shape[:3], -1).sum(-1)
        return torch.logsumexp(lp, 0) - math.log(S)

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` draws ``(num_samples, T, N, ...)``, every component equally often
        (stratified), in a random order."""
        S = self.num_components
        per = -(-num_samples // S)
        draws = _seeded_draws(self.components, (per,), generator)  # (per, S * T, N, ...)
        draws = draws.reshape(per * S, draws.shape[1] // S, *draws.shape[2:])
        order = torch.randperm(per * S, generator=generator)[:num_samples]
        return draws[order.to(draws.device)]

    def _draws(self) -> Tensor:
        if "draws" not in self._cache:
            generator = torch.Generator().manual_seed(self.seed)
            self._cache["draws"] = self.sample(self.num_draws, generator=generator)
        return self._cache["draws"]

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1); got {level}")
        draws = self._draws().to(torch.get_default_dtype())
        lower = torch.quantile(draws, (1 - level) / 2, dim=0, interpolation="lower")
        upper = torch.quantile(draws, (1 + level) / 2, dim=0, interpolation="higher")
        return lower, upper


def mixture_from_distribution(fn: dist.Distribution, num_components: int) -> Prediction:
    r"""The predictive :math:`\frac1S\sum_s p(y\mid\phi^{(s)}, x)` from the model's observation
    distribution at ``S = num_components`` draws of :math:`\phi` for ``T`` tasks, batch shape
    ``(S * T, N)`` (draw-major): a :class:`MixturePrediction` for Normal observations, the mean
    class probabilities for Categorical ones, a :class:`DrawsPrediction` otherwise."""
    per_draw = prediction_from_distribution(fn)
    S = num_components
    if isinstance(per_draw, CategoricalPrediction):
        probs = per_draw.probs
        return CategoricalPrediction(probs.reshape(S, -1, *probs.shape[1:]).mean(0))
    if isinstance(per_draw, GaussianPrediction):
        shape = (S, -1, *per_draw.mean.shape[1:])
        # the noise varies with the draw where a per-task noise scale is part of phi
        return MixturePrediction(per_draw.mean.reshape(shape), per_draw.variance.reshape(shape))
    assert isinstance(per_draw, DrawsPrediction)
    return DrawsPrediction(per_draw.components, num_components=S)


def prediction_from_distribution(fn: dist.Distribution) -> Prediction:
    """A :class:`Prediction` from a model's observation distribution (batch ``(T, N)``): closed
    forms for Normal and Categorical observations, :class:`DrawsPrediction` for any other."""
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
    return DrawsPrediction(fn)
