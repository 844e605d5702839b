"""Inference: the truncated-gradient guide, meta-objectives, ``fit`` and task posteriors."""

from hierbayes.inference.evaluation import TaskMetrics, evaluate_posterior, mean_ci95
from hierbayes.inference.fit import (
    FitResult,
    MetaTrainingDiverged,
    Method,
    fit,
    methods,
    register_method,
)
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.inner_loop import gradient_steps
from hierbayes.inference.objectives import MAMLObjective, MetaObjective
from hierbayes.inference.posterior import PointMassPosterior, TaskPosterior
from hierbayes.inference.predictive import (
    CategoricalPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
)

__all__ = [
    "CategoricalPrediction",
    "FitResult",
    "GaussianPrediction",
    "MAMLObjective",
    "MetaObjective",
    "MetaTrainingDiverged",
    "Method",
    "MixturePrediction",
    "PointMassPosterior",
    "Prediction",
    "TaskMetrics",
    "TaskPosterior",
    "TruncatedGradientGuide",
    "evaluate_posterior",
    "fit",
    "gradient_steps",
    "mean_ci95",
    "methods",
    "register_method",
]
