r"""The Laplace predictive objective: the query set's likelihood under each task's Laplace
posterior predictive.

``"predictive"`` (:class:`LinearizedPredictiveObjective`, the default LLAMA objective), the
negative log likelihood of the query set under the Laplace posterior predictive, with
:math:`\hat H_j` from the support set; for a Gaussian network the linearised predictive

.. math::

    \mathcal L = -\frac1T\sum_j\sum_m \log\mathcal N\big(y^q_{jm};\, f(x^q_{jm};\hat\phi_j),\,
        \sigma^2 + J_{jm}\hat H_j^{-1}J_{jm}^\top\big),

for a network classifier its probit approximation, and for any other Pyro program a mixture of
the model's own observation distribution over reparameterised draws of :math:`\phi_j`
(:mod:`hierbayes.inference.core.predictive`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.core.predictive import (
    PredictiveApprox,
    predictive_losses,
    predictive_parts,
    resolve_predictive,
)
from hierbayes.inference.objectives.base import ReplayedModel, TaskLosses
from hierbayes.inference.objectives.laplace import LaplaceObjective
from hierbayes.inference.objectives.replay import pointwise_log_prob, retrace, widened
from hierbayes.models.density import TaskDensity, capabilities
from hierbayes.tasks.batch import TaskBatch

__all__ = ["LinearizedPredictiveObjective"]


class LinearizedPredictiveObjective(LaplaceObjective):
    r"""Query NLL under the Laplace predictive with support-set curvature, for any model.

    ``predictive`` chooses the approximation
    (:func:`~hierbayes.inference.core.predictive.predictive_losses`): ``"auto"`` (default)
    takes the linearised Gaussian predictive for a Gaussian network, the probit approximation
    for a network classifier and ``num_samples`` reparameterised draws of :math:`\phi_j`
    through the model's own observation site for any other Pyro program.
    """

    name = "predictive"

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        predictive: PredictiveApprox = "auto",
        num_samples: int = 16,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        if self.curvature_data != "support":
            raise ValueError(
                "the predictive objective conditions on the support set only: its curvature "
                "must be of the support set (curvature_data='support')"
            )
        if predictive not in ("auto", "linearized", "probit", "sampled"):
            raise ValueError(
                "predictive must be 'auto', 'linearized', 'probit' or 'sampled'; "
                f"got {predictive!r}"
            )
        if isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        self.predictive: PredictiveApprox = predictive
        self.num_samples = num_samples

    @property
    def options(self) -> dict[str, Any]:
        return {**super().options, "predictive": self.predictive, "num_samples": self.num_samples}

    def approximation(self, density: TaskDensity) -> str:
        """The approximation ``predictive`` stands for with ``density`` (``"auto"`` resolved,
        refused where the model cannot take it)."""
        return resolve_predictive(self.predictive, capabilities(density))

    def check(self, density: TaskDensity) -> None:
        super().check(density)
        self.approximation(density)  # refuses, before training, what the model cannot take

    def _options(
        self, density: TaskDensity, params: Mapping[str, Tensor], T: int
    ) -> dict[str, Any]:
        return {
            "precision": self.precision(density, params, T),
            "curvature": self.curvature_for(density),
            "jacobian": self.jacobian,
            "capabilities": capabilities(density),
            "predictive": self.predictive,
            "num_samples": self.num_samples,
        }

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskLosses:
        return TaskLosses(
            predictive_losses(
                density, params, phi, batch, **self._options(density, params, phi.shape[0])
            )
        )

    def replayed_losses(
        self,
        model: Callable[..., Any],
        density: TaskDensity,
        replayed: ReplayedModel,
        batch: TaskBatch,
    ) -> Tensor:
        r"""The curvature's part from the core at the replayed values; the likelihood from the
        model's own observation sites: the replayed sites widened by the epistemic variance
        (linearised, probit), or the model traced again at each draw of :math:`\phi`
        (sampled), mixed per point."""
        params, phi = replayed.params, replayed.phi
        structure = density.structure
        T = phi.shape[0]
        parts = predictive_parts(density, params, phi, batch, **self._options(density, params, T))
        if parts.draws is None:
            assert parts.variance is not None and parts.outputs is not None
            widen = widened(parts.variance, parts.approximation, parts.outputs)
            log_pred = pointwise_log_prob(replayed.trace, structure, T, replayed.mask, widen)
        else:
            S = parts.draws.shape[0]
            x, y, mask = replayed.x, replayed.y, replayed.mask
            xs = x.unsqueeze(0).expand(S, *x.shape).reshape(S * T, *x.shape[1:])
            ys = y.unsqueeze(0).expand(S, *y.shape).reshape(S * T, *y.shape[1:])
            trace = retrace(model, structure, params, parts.draws.reshape(S * T, -1), xs, ys)
            masks = None if mask is None else mask.unsqueeze(0).expand(S, *mask.shape)
            per_draw = pointwise_log_prob(
                trace, structure, S * T, None if masks is None else masks.reshape(S * T, -1)
            ).reshape(S, T, -1)
            log_pred = torch.logsumexp(per_draw, 0) - math.log(S)
            if mask is not None:
                log_pred = torch.where(mask, log_pred, torch.zeros_like(log_pred))
        return -log_pred.sum(-1) * replayed.scale
