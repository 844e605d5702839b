"""Inference: the truncated-gradient guide, meta-objectives, ``fit`` and task posteriors."""

from hierbayes.inference.compare import (
    ComparisonResult,
    ReferenceNotConvergedWarning,
    compare_approximations,
    wasserstein2_gaussian,
)
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
from hierbayes.inference.laplace import (
    LaplacePosterior,
    laplace_log_evidence,
    laplace_posterior,
    linearized_predictive,
)
from hierbayes.inference.llama import (
    LaplaceEvidenceObjective,
    LaplacePenaltyObjective,
    LinearizedPredictiveObjective,
    llama_objective,
)
from hierbayes.inference.meanfield import MeanFieldPosterior, meanfield_vi
from hierbayes.inference.nuts import nuts_numpyro, nuts_pyro
from hierbayes.inference.objectives import MAMLObjective, MetaObjective
from hierbayes.inference.posterior import PointMassPosterior, TaskPosterior
from hierbayes.inference.predictive import (
    CategoricalPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
)
from hierbayes.inference.samples import GaussianPosterior, SamplePosterior

__all__ = [
    "CategoricalPrediction",
    "ComparisonResult",
    "FitResult",
    "GaussianPosterior",
    "GaussianPrediction",
    "LaplaceEvidenceObjective",
    "LaplacePenaltyObjective",
    "LaplacePosterior",
    "LinearizedPredictiveObjective",
    "MAMLObjective",
    "MeanFieldPosterior",
    "MetaObjective",
    "MetaTrainingDiverged",
    "Method",
    "MixturePrediction",
    "PointMassPosterior",
    "Prediction",
    "ReferenceNotConvergedWarning",
    "SamplePosterior",
    "TaskMetrics",
    "TaskPosterior",
    "TruncatedGradientGuide",
    "compare_approximations",
    "evaluate_posterior",
    "fit",
    "gradient_steps",
    "laplace_log_evidence",
    "laplace_posterior",
    "linearized_predictive",
    "llama_objective",
    "mean_ci95",
    "meanfield_vi",
    "methods",
    "nuts_numpyro",
    "nuts_pyro",
    "register_method",
    "wasserstein2_gaussian",
]
