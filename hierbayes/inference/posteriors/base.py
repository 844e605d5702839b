r"""Task posteriors :math:`q(\phi_j \mid \mathcal D^s_j, \theta)` returned by ``FitResult.adapt``.

MAML's guide gives a point mass :math:`\delta(\phi_j - \hat\phi_j)`
(:class:`PointMassPosterior`); the Laplace methods give :math:`\mathcal N(\hat\phi_j,
\hat H_j^{-1})` (:class:`hierbayes.inference.posteriors.laplace.LaplacePosterior`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.predictions import Prediction, prediction_from_distribution
from hierbayes.models.density import TaskDensity

__all__ = ["PointMassPosterior", "TaskPosterior"]


class TaskPosterior:
    r"""A posterior over :math:`\phi_j` for each of ``T`` tasks, with predictions on new inputs.

    Attributes
    ----------
    mean:
        ``(T, D)`` posterior means (the adapted :math:`\hat\phi_j`).
    params:
        The global point estimates (:math:`\theta`, noise scale, ...) it was computed with.
    """

    def __init__(self, density: TaskDensity, params: Mapping[str, Tensor], mean: Tensor) -> None:
        self.density = density
        self.params = {k: v.detach() for k, v in params.items()}
        self.mean = mean.detach()

    @property
    def num_tasks(self) -> int:
        return int(self.mean.shape[0])

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws of :math:`\phi`, ``(num_samples, T, D)``."""
        raise NotImplementedError

    def predict(self, x: Tensor, **kwargs: Any) -> Prediction:
        """Predictive distribution of targets at new inputs ``x`` ``(T, M, ...)``."""
        raise NotImplementedError

    def marginal_variance(self) -> Tensor:
        r"""Each parameter's posterior variance, ``(T, D)``."""
        raise NotImplementedError

    @property
    def sd(self) -> Tensor:
        r"""Each parameter's posterior standard deviation, ``(T, D)``: the same attribute on
        every posterior (point mass, Laplace, Gaussian, draws, hyper-Laplace mixture)."""
        return self.marginal_variance().clamp_min(0.0).sqrt()


class PointMassPosterior(TaskPosterior):
    r""":math:`\delta(\phi_j - \hat\phi_j)`: MAML's amortised point estimate.

    Its predictive is the likelihood at :math:`\hat\phi_j`, e.g.
    :math:`\mathcal N(f(x;\hat\phi_j), \sigma^2)` with the learned noise scale.
    """

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        return self.mean.expand(num_samples, *self.mean.shape)

    def marginal_variance(self) -> Tensor:
        """Zero: a point mass has no spread."""
        return torch.zeros_like(self.mean)

    def predict(self, x: Tensor, **kwargs: Any) -> Prediction:
        with torch.no_grad():
            return prediction_from_distribution(self.density.predictive(self.params, self.mean, x))
