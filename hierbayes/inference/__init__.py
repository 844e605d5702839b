"""Inference: the truncated-gradient guide, meta-objectives, ``fit`` and task posteriors."""

from hierbayes.inference.core.evidence import laplace_log_evidence
from hierbayes.inference.core.inner_loop import gradient_steps
from hierbayes.inference.core.laplace import linearized_predictive
from hierbayes.inference.diagnostics.compare import (
    ComparisonResult,
    ReferenceNotConvergedWarning,
    compare_approximations,
)
from hierbayes.inference.diagnostics.metrics import TaskMetrics, evaluate_posterior, mean_ci95
from hierbayes.inference.diagnostics.wasserstein import wasserstein2_gaussian
from hierbayes.inference.posteriors.base import PointMassPosterior, TaskPosterior
from hierbayes.inference.posteriors.gaussian import GaussianPosterior
from hierbayes.inference.posteriors.hyper_laplace import (
    HyperLaplace,
    HyperLaplacePosterior,
    hyper_laplace,
)
from hierbayes.inference.posteriors.laplace import LaplacePosterior, laplace_posterior
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.predictions import (
    CategoricalPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
)
from hierbayes.inference.reference.full_bayes import FullBayesPosterior, nuts_full_bayes
from hierbayes.inference.reference.meanfield import MeanFieldPosterior, meanfield_vi
from hierbayes.inference.reference.nuts import nuts_numpyro, nuts_pyro
from hierbayes.inference.svi.guide import TruncatedGradientGuide
from hierbayes.inference.svi.llama import (
    LaplaceEvidenceObjective,
    LaplacePenaltyObjective,
    LinearizedPredictiveObjective,
    llama_objective,
)
from hierbayes.inference.svi.objectives import MAMLObjective, MetaObjective
from hierbayes.inference.training.config import GuideConfig, OptimConfig, RunConfig
from hierbayes.inference.training.distributed import DistributedTrainingError
from hierbayes.inference.training.empirical_bayes import Convergence, UnconvergedWarning
from hierbayes.inference.training.fit import fit
from hierbayes.inference.training.load import load
from hierbayes.inference.training.methods import Method, methods, register_method
from hierbayes.inference.training.persistence import CheckpointError
from hierbayes.inference.training.result import (
    FitResult,
    MetaTrainingDiverged,
    MetaTrainingInterrupted,
)

__all__ = [
    "CategoricalPrediction",
    "CheckpointError",
    "ComparisonResult",
    "Convergence",
    "DistributedTrainingError",
    "FitResult",
    "FullBayesPosterior",
    "GaussianPosterior",
    "GaussianPrediction",
    "GuideConfig",
    "HyperLaplace",
    "HyperLaplacePosterior",
    "LaplaceEvidenceObjective",
    "LaplacePenaltyObjective",
    "LaplacePosterior",
    "LinearizedPredictiveObjective",
    "MAMLObjective",
    "MeanFieldPosterior",
    "MetaObjective",
    "MetaTrainingDiverged",
    "MetaTrainingInterrupted",
    "Method",
    "MixturePrediction",
    "OptimConfig",
    "PointMassPosterior",
    "Prediction",
    "ReferenceNotConvergedWarning",
    "RunConfig",
    "SamplePosterior",
    "TaskMetrics",
    "TaskPosterior",
    "TruncatedGradientGuide",
    "UnconvergedWarning",
    "compare_approximations",
    "evaluate_posterior",
    "fit",
    "gradient_steps",
    "hyper_laplace",
    "laplace_log_evidence",
    "laplace_posterior",
    "linearized_predictive",
    "llama_objective",
    "load",
    "mean_ci95",
    "meanfield_vi",
    "methods",
    "nuts_full_bayes",
    "nuts_numpyro",
    "nuts_pyro",
    "register_method",
    "wasserstein2_gaussian",
]
