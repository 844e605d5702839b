r"""Task posteriors that integrate over the globals: draws of :math:`(\theta, \phi_{1:T})` together.

Empirical Bayes conditions every task posterior on one value :math:`\hat\theta`; a full-Bayes
reference (:func:`~hierbayes.inference.references.full_bayes.nuts_full_bayes`) and the
hyperparameter-uncertainty posterior (:func:`~hierbayes.inference.posteriors.hyper_laplace.hyper_laplace`)
integrate over :math:`\theta` instead:

.. math::

    p(\phi_j \mid \mathcal D) = \int p(\phi_j \mid \mathcal D_j, \theta)\, p(\theta\mid\mathcal D)
    \,d\theta .

Their draws of :math:`\phi` come with the draws of the globals they were made with, and the
predictive must use the pair: :math:`p(y\mid x, \mathcal D) \approx \frac1S \sum_s p(y \mid x,
\phi^{(s)}_j, \theta^{(s)})` (in a grouped regression the noise scale and the population-level
weights are globals). :class:`JointDrawsPosterior` is the declared protocol the evaluation reads
(:func:`~hierbayes.inference.diagnostics.readout.posterior_draws` and the ArviZ bridge), and
:func:`predict_from_joint_draws` the mixture over pairs, one model evaluation per draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from hierbayes.inference.predictions import (
    CategoricalPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
    prediction_from_distribution,
)
from hierbayes.models.density import TaskDensity

__all__ = [
    "JointDrawsPosterior",
    "JointMixturePrediction",
    "params_at",
    "predict_from_joint_draws",
]


@runtime_checkable
class JointDrawsPosterior(Protocol):
    r"""A task posterior whose draws of :math:`\phi` come with draws of the global latents.

    ``fixed`` holds the global values that do not vary (``pyro.param`` sites)."""

    fixed: Mapping[str, Tensor]

    def joint_draws(
        self, num_chains: int, num_draws: int, *, seed: int = 0
    ) -> tuple[dict[str, Tensor], Tensor]:
        r"""``(globals, phi)``: each global site's draws ``(C, S, *site_shape)`` (constrained
        values, keyed by site name) and the matching draws of :math:`\phi` ``(C, S, T, D)``."""
        ...


def params_at(
    fixed: Mapping[str, Tensor], global_draws: Mapping[str, Tensor], index: int
) -> dict[str, Tensor]:
    """The global values of draw ``index`` of flattened ``(S, ...)`` draws, over ``fixed``
    (the values that do not vary: ``pyro.param`` sites, globals held fixed)."""
    found = dict(fixed)
    for name, value in global_draws.items():
        found[name] = value[index]
    return found


@dataclass
class JointMixturePrediction(Prediction):
    r"""Equal-weight mixture :math:`\frac1S\sum_s p_s(y)` of per-draw predictions of any family.

    ``components`` are ``S`` point predictions (each ``(T, N, ...)``), one per joint draw
    :math:`(\theta^{(s)}, \phi^{(s)})`. Moments by the law of total variance; intervals are
    empirical quantiles of ``num_draws`` stratified draws (``seed``), the lower rounded down and
    the upper up (a discrete predictive's interval holds at least ``level`` of its mass).
    """

    components: Sequence[Prediction]
    num_draws: int = 2000
    seed: int = 0
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def _moments(self) -> tuple[Tensor, Tensor]:
        if "mean" not in self._cache:
            means = torch.stack([c.mean for c in self.components])
            variances = torch.stack([_variance(c) for c in self.components])
            self._cache["mean"] = means.mean(0)
            self._cache["variance"] = variances.mean(0) + means.var(0, unbiased=False)
        return self._cache["mean"], self._cache["variance"]

    @property
    def mean(self) -> Tensor:  # type: ignore[override]
        return self._moments()[0]

    @property
    def variance(self) -> Tensor:
        return self._moments()[1]

    def log_prob(self, y: Tensor) -> Tensor:
        lp = torch.stack([c.log_prob(y) for c in self.components])
        return torch.logsumexp(lp, 0) - math.log(len(self.components))

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        S = len(self.components)
        per = -(-num_samples // S)
        draws = torch.cat([c.sample(per, generator=generator) for c in self.components])
        order = torch.randperm(per * S, generator=generator)[:num_samples]
        return draws[order.to(draws.device)]

    def interval(self, level: float = 0.9) -> tuple[Tensor, Tensor]:
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1); got {level}")
        if "draws" not in self._cache:
            generator = torch.Generator().manual_seed(self.seed)
            self._cache["draws"] = self.sample(self.num_draws, generator=generator)
        draws = self._cache["draws"].to(torch.get_default_dtype())
        lower = torch.quantile(draws, (1 - level) / 2, dim=0, interpolation="lower")
        upper = torch.quantile(draws, (1 + level) / 2, dim=0, interpolation="higher")
        return lower, upper


def _variance(prediction: Prediction) -> Tensor:
    variance = getattr(prediction, "variance", None)
    if isinstance(variance, Tensor):
        return variance
    raise NotImplementedError(f"{type(prediction).__name__} states no variance")


def predict_from_joint_draws(
    density: TaskDensity,
    fixed: Mapping[str, Tensor],
    global_draws: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
) -> Prediction:
    r"""The predictive mixture :math:`\frac1S\sum_s p(y\mid x, \phi^{(s)}_j, \theta^{(s)})`.

    Parameters
    ----------
    density:
        The task density.
    fixed:
        Global values that do not vary over the draws.
    global_draws:
        Each varying global site's draws ``(S, *site_shape)``.
    phi:
        ``(S, T, D)`` the matching draws of :math:`\phi`.
    x:
        ``(T, M, *input_shape)`` inputs.

    Returns
    -------
    A :class:`~hierbayes.inference.posteriors.MixturePrediction` for Normal observations, the mean class
    probabilities for Categorical ones, a :class:`JointMixturePrediction` otherwise. The model
    is evaluated once per draw (the globals differ from draw to draw).
    """
    S = phi.shape[0]
    parts: list[Prediction] = []
    with torch.no_grad():
        for s in range(S):
            fn = density.predictive(params_at(fixed, global_draws, s), phi[s], x)
            parts.append(prediction_from_distribution(fn))
    first = parts[0]
    if isinstance(first, CategoricalPrediction):
        probs = torch.stack([p.probs for p in parts if isinstance(p, CategoricalPrediction)])
        return CategoricalPrediction(probs.mean(0))
    if isinstance(first, GaussianPrediction):
        gaussians = [p for p in parts if isinstance(p, GaussianPrediction)]
        return MixturePrediction(
            torch.stack([p.mean for p in gaussians]), torch.stack([p.variance for p in gaussians])
        )
    return JointMixturePrediction(parts)
