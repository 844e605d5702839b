r"""The predictive of a posterior held as draws: an equal-weight mixture over the draws.

.. math::

    q(y \mid x, \mathcal D^s_j) = \frac1S \sum_{s=1}^S p(y \mid \phi^{(s)}_j, x)

Gaussian likelihood: :class:`~hierbayes.inference.posteriors.MixturePrediction` (one noise variance for
all draws, or one per draw when a per-task noise scale is part of :math:`\phi`); categorical:
the mean of the class probabilities. Used by every posterior that predicts by sampling
(:class:`~hierbayes.inference.posteriors.samples.SamplePosterior`, the Gaussian posteriors of
:mod:`hierbayes.inference.posteriors.gaussian`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hierbayes.inference.predictions import (
    MixturePrediction,
    Prediction,
    mixture_from_distribution,
)
from hierbayes.models.density import TaskDensity

__all__ = ["PerDrawNoiseMixture", "predict_from_draws"]

#: Kept as a name: :class:`~hierbayes.inference.predictions.MixturePrediction` takes
#: one noise variance per draw itself.
PerDrawNoiseMixture = MixturePrediction


def predict_from_draws(
    density: TaskDensity, params: Mapping[str, Tensor], draws: Tensor, x: Tensor
) -> Prediction:
    r"""The predictive mixture :math:`\frac1S\sum_s p(y\mid\phi^{(s)}_j, x)` at inputs ``x``.

    Parameters
    ----------
    density, params:
        The task density and the global values.
    draws:
        ``(S, T, D)`` draws of :math:`\phi`.
    x:
        ``(T, M, *input_shape)`` inputs.

    Returns
    -------
    :class:`~hierbayes.inference.posteriors.MixturePrediction` with component means ``(S, T, M, C)``
    (Gaussian likelihood) or :class:`~hierbayes.inference.posteriors.CategoricalPrediction` with the mean
    class probabilities ``(T, M, C)``. All draws are evaluated in one call of the density.
    """
    S, T, D = draws.shape
    flat = draws.reshape(S * T, D)
    xs = x.unsqueeze(0).expand(S, *x.shape).reshape(S * T, *x.shape[1:])
    with torch.no_grad():
        return mixture_from_distribution(density.predictive(params, flat, xs), S)
