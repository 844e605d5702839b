"""Moved to :mod:`hierbayes.inference.objectives` (kept while the package is reorganised)."""

from hierbayes.inference.objectives import (
    LLAMA_OBJECTIVES,
    LaplaceEvidenceObjective,
    LaplaceObjective,
    LaplacePenaltyObjective,
    LinearizedPredictiveObjective,
    llama_objective,
)

__all__ = [
    "LLAMA_OBJECTIVES",
    "LaplaceEvidenceObjective",
    "LaplaceObjective",
    "LaplacePenaltyObjective",
    "LinearizedPredictiveObjective",
    "llama_objective",
]
