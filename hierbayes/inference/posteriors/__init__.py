r"""Task posteriors :math:`q(\phi_j\mid\mathcal D^s_j, \theta)` and their predictives.

A fit's :meth:`~hierbayes.inference.FitResult.adapt` returns the posterior its objective
implies: MAML's point mass, or the Laplace Gaussian :math:`\mathcal N(\hat\phi_j, \hat H_j^{-1})`
of the LLAMA objectives. Every posterior has ``mean``, ``sd``, ``sample`` and ``predict``; a
prediction (:class:`Prediction`) has ``log_prob``, ``mean``, ``interval`` and ``sample``.

* :class:`PointMassPosterior`, :class:`LaplacePosterior` (:func:`laplace_posterior` builds one
  at any point), :class:`GaussianPosterior`, :class:`SamplePosterior` (MCMC draws with
  diagnostics);
* :func:`hyper_laplace`: a Gaussian over the unconstrained globals and task posteriors mixed
  over it (:class:`HyperLaplace`, :class:`HyperLaplacePosterior`);
* predictions: :class:`GaussianPrediction`, :class:`MixturePrediction`,
  :class:`CategoricalPrediction`, :class:`DrawsPrediction` (any observation family).
"""

from hierbayes.inference.posteriors.base import PointMassPosterior, TaskPosterior
from hierbayes.inference.posteriors.gaussian import GaussianPosterior
from hierbayes.inference.posteriors.hyper_laplace import HyperLaplace, hyper_laplace
from hierbayes.inference.posteriors.hyper_posterior import HyperLaplacePosterior
from hierbayes.inference.posteriors.laplace import LaplacePosterior, laplace_posterior
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.predictions import (
    CategoricalPrediction,
    DrawsPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
)

__all__ = [
    "CategoricalPrediction",
    "DrawsPrediction",
    "GaussianPosterior",
    "GaussianPrediction",
    "HyperLaplace",
    "HyperLaplacePosterior",
    "LaplacePosterior",
    "MixturePrediction",
    "PointMassPosterior",
    "Prediction",
    "SamplePosterior",
    "TaskPosterior",
    "hyper_laplace",
    "laplace_posterior",
]
