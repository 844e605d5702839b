r"""Inference: the truncated-gradient guide, the meta-objectives, and ``fit``.

The names a Pyro user reaches for first live here; the rest in subpackages:

* :mod:`hierbayes.inference.posteriors`: task posteriors and predictions, ``hyper_laplace``;
* :mod:`hierbayes.inference.references`: NUTS (Pyro, NumPyro), full Bayes, mean-field VI;
* :mod:`hierbayes.inference.diagnostics`: metrics, ``compare_approximations``, ArviZ;
* :mod:`hierbayes.inference.objectives`: the meta-objectives' modules;
* :mod:`hierbayes.inference.core` and :mod:`hierbayes.inference.curvature`: the functional
  core (inner loop, mode search, Laplace evidence, predictives) and the curvature backends;
* :mod:`hierbayes.inference.linear_gaussian`: the linear-Gaussian theorem in closed form.
"""

from hierbayes.inference import diagnostics, posteriors, references
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.objectives import (
    LaplaceEvidenceObjective,
    LaplacePenaltyObjective,
    LinearizedPredictiveObjective,
    MAMLObjective,
    MetaObjective,
    llama_objective,
)
from hierbayes.inference.training.config import GuideConfig, OptimConfig, RunConfig
from hierbayes.inference.training.convergence import Convergence
from hierbayes.inference.training.distributed import DistributedTrainingError
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
    "CheckpointError",
    "Convergence",
    "DistributedTrainingError",
    "FitResult",
    "GuideConfig",
    "LaplaceEvidenceObjective",
    "LaplacePenaltyObjective",
    "LinearizedPredictiveObjective",
    "MAMLObjective",
    "MetaObjective",
    "MetaTrainingDiverged",
    "MetaTrainingInterrupted",
    "Method",
    "OptimConfig",
    "RunConfig",
    "TruncatedGradientGuide",
    "diagnostics",
    "fit",
    "llama_objective",
    "load",
    "methods",
    "posteriors",
    "references",
    "register_method",
]
