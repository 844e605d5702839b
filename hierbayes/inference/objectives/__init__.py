r"""Meta-objectives: stateless Pyro losses over the functional core, each with its task posterior.

========================================  ============  ===============================================
objective                                  name          loss of task :math:`j`
========================================  ============  ===============================================
:class:`MAMLObjective`                     ``maml``      :math:`-\log p(y^q_j\mid\hat\phi_j)`
:class:`LinearizedPredictiveObjective`     ``predictive`` query NLL under the Laplace predictive
:class:`LaplaceEvidenceObjective`          ``evidence``  :math:`-\log\hat p(\mathcal D_j\mid\theta)` at the mode
:class:`LaplacePenaltyObjective`           ``paper``     :math:`-\log p(y^q_j\mid\hat\phi_j)+\eta\log\det\hat H_j`
========================================  ============  ===============================================
"""

from __future__ import annotations

from typing import Any

from hierbayes.inference.objectives.base import (
    MetaLoss,
    MetaObjective,
    ReplayedModel,
    TaskLosses,
    as_task_batch,
    task_scale,
)
from hierbayes.inference.objectives.evidence import LaplaceEvidenceObjective
from hierbayes.inference.objectives.laplace import LaplaceObjective, LaplacePenaltyObjective
from hierbayes.inference.objectives.maml import MAMLObjective
from hierbayes.inference.objectives.predictive import LinearizedPredictiveObjective

__all__ = [
    "LLAMA_OBJECTIVES",
    "LaplaceEvidenceObjective",
    "LaplaceObjective",
    "LaplacePenaltyObjective",
    "LinearizedPredictiveObjective",
    "MAMLObjective",
    "MetaLoss",
    "MetaObjective",
    "ReplayedModel",
    "TaskLosses",
    "as_task_batch",
    "llama_objective",
    "task_scale",
]

#: The LLAMA objectives by name (``fit(..., method="llama", objective=NAME)``).
LLAMA_OBJECTIVES: dict[str, type[LaplaceObjective]] = {
    "predictive": LinearizedPredictiveObjective,
    "evidence": LaplaceEvidenceObjective,
    "paper": LaplacePenaltyObjective,
}


def llama_objective(
    num_tasks: int | None = None, objective: str = "predictive", **options: Any
) -> LaplaceObjective:
    """The LLAMA objective named ``objective`` (``"predictive"``, ``"evidence"`` or ``"paper"``)."""
    if objective not in LLAMA_OBJECTIVES:
        raise ValueError(
            f"unknown LLAMA objective {objective!r}; known: {sorted(LLAMA_OBJECTIVES)}"
        )
    return LLAMA_OBJECTIVES[objective](num_tasks, **options)
