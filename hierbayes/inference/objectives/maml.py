r"""The MAML meta-objective: the query negative log likelihood at the truncated-gradient
point estimate (Finn et al. 2017; Grant et al. 2018, eq. 1 and 3).

.. math::

    \mathcal L(\theta) = -\frac1T \sum_{j=1}^{T} \log p(y^q_j \mid \hat\phi_j(\theta), x^q_j)
                         \;-\; \frac1J \log p(\theta)

Its task posterior is the guide's point mass :math:`\delta(\phi_j - \hat\phi_j)`
(:meth:`MAMLObjective.posterior`, beside the loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from hierbayes.inference.core.losses import query_nll
from hierbayes.inference.objectives.base import MetaObjective, ReplayedModel, TaskLosses
from hierbayes.inference.posteriors.base import PointMassPosterior, TaskPosterior
from hierbayes.models.density import TaskDensity
from hierbayes.models.structure import per_task_log_prob
from hierbayes.tasks.batch import TaskBatch

__all__ = ["MAMLObjective"]


class MAMLObjective(MetaObjective):
    r"""The MAML meta-objective: query negative log likelihood at :math:`\hat\phi`.

    On the Pyro road the query likelihood is the sum of the replayed model's observed sites,
    each with its own scale and mask, exactly as ``Trace_ELBO`` scores a model.
    """

    name = "maml"

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskLosses:
        return TaskLosses(query_nll(density, params, phi, batch))

    def replayed_losses(
        self,
        model: Callable[..., Any],
        density: TaskDensity,
        replayed: ReplayedModel,
        batch: TaskBatch,
    ) -> Tensor:
        return -per_task_log_prob(
            replayed.trace, density.structure, replayed.phi.shape[0], replayed.mask
        )

    def posterior(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskPosterior:
        r""":math:`\delta(\phi_j - \hat\phi_j)`: MAML's amortised point estimate."""
        return PointMassPosterior(density, params, phi)
