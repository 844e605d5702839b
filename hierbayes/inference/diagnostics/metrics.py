r"""Per-task evaluation on held-out query sets, and summaries with 95% intervals.

The interval of a mean over :math:`T` tasks is :math:`\bar m \pm 1.96\, s/\sqrt T`, the
convention of the few-shot literature (Finn et al. 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.predictions import (
    CategoricalPrediction,
    DrawsPrediction,
    as_targets,
)
from hierbayes.tasks.batch import TaskBatch

__all__ = ["TaskMetrics", "evaluate_posterior", "mean_ci95"]


def mean_ci95(values: Tensor) -> dict[str, float]:
    r"""``{"mean", "ci95", "sd", "n"}`` of per-task values: ``ci95`` is the half-width
    :math:`1.96\,s/\sqrt n`."""
    v = values.detach().double().flatten()
    n = v.numel()
    sd = float(v.std(unbiased=True)) if n > 1 else float("nan")
    return {
        "mean": float(v.mean()),
        "ci95": 1.96 * sd / math.sqrt(n) if n > 1 else float("nan"),
        "sd": sd,
        "n": n,
    }


@dataclass
class TaskMetrics:
    """Query-set metrics, one value per task.

    ``nll`` is the mean negative log predictive density per query point; ``coverage[level]``
    the fraction of query points inside the central ``level`` predictive interval; ``mse`` the
    mean squared error of the predictive mean (regression) and ``accuracy`` the fraction of
    correct labels (classification, and 0/1 labels of a Bernoulli observation, whose ``mse``
    is then the Brier score). Any observation distribution of the model is scored: where the
    predictive has no closed form it is a mixture over draws
    (:class:`~hierbayes.inference.predictions.DrawsPrediction`): NLL by log-mean-exp
    over the draws, intervals from its quantiles.
    """

    nll: Tensor
    mse: Tensor | None = None
    accuracy: Tensor | None = None
    coverage: dict[float, Tensor] = field(default_factory=dict)
    #: Query points per task (the weights of pooled figures).
    points: Tensor | None = None

    @classmethod
    def concat(cls, parts: list[TaskMetrics]) -> TaskMetrics:
        """The metrics of several task batches, one after the other."""
        first = parts[0]
        return cls(
            nll=torch.cat([p.nll for p in parts]),
            mse=None
            if first.mse is None
            else torch.cat([p.mse for p in parts if p.mse is not None]),
            accuracy=None
            if first.accuracy is None
            else torch.cat([p.accuracy for p in parts if p.accuracy is not None]),
            coverage={lvl: torch.cat([p.coverage[lvl] for p in parts]) for lvl in first.coverage},
            points=None
            if first.points is None
            else torch.cat([p.points for p in parts if p.points is not None]),
        )

    def pooled_coverage(self, level: float) -> float:
        """The fraction of all query points (of all tasks) inside their ``level`` interval."""
        per_task = self.coverage[level].double()
        if self.points is None:
            return float(per_task.mean())
        weights = self.points.double()
        return float((per_task * weights).sum() / weights.sum())

    def summary(self) -> dict[str, Any]:
        """Plain-data summary: each metric's mean and 95% interval half-width over tasks, and
        coverage as the fraction of all query points inside their intervals."""
        out: dict[str, Any] = {"nll": mean_ci95(self.nll)}
        if self.mse is not None:
            out["mse"] = mean_ci95(self.mse)
        if self.accuracy is not None:
            out["accuracy"] = mean_ci95(self.accuracy)
        if self.coverage:
            out["coverage"] = {f"{lvl:g}": self.pooled_coverage(lvl) for lvl in self.coverage}
        return out


def evaluate_posterior(
    posterior: TaskPosterior,
    batch: TaskBatch,
    *,
    levels: tuple[float, ...] = (0.5, 0.9),
    **predict_options: Any,
) -> TaskMetrics:
    """Score ``posterior``'s predictions on ``batch``'s query sets."""
    xq, yq, mask = batch.require_query("evaluation")
    prediction = posterior.predict(xq, **predict_options)
    with torch.no_grad():
        weights = torch.ones(
            yq.shape[:2],
            dtype=xq.dtype if xq.is_floating_point() else torch.get_default_dtype(),
            device=yq.device,
        )
        if mask is not None:
            weights = mask.to(weights.dtype)
        counts = weights.sum(1)

        def per_task(values: Tensor) -> Tensor:
            return (values * weights).sum(1) / counts

        nll = per_task(-prediction.log_prob(yq))
        if isinstance(prediction, CategoricalPrediction):
            labels = as_targets(yq, prediction.probs.shape[:-1])
            correct = (prediction.probs.argmax(-1) == labels).to(weights.dtype)
            return TaskMetrics(nll=nll, accuracy=per_task(correct), points=counts)
        err = (prediction.mean - as_targets(yq, prediction.mean)).square()
        mse = per_task(err.reshape(*err.shape[:2], -1).mean(-1))
        coverage = {lvl: per_task(prediction.covers(yq, lvl).to(weights.dtype)) for lvl in levels}
        accuracy = None
        if isinstance(prediction, DrawsPrediction) and prediction.binary:
            # 0/1 labels: mse is the Brier score; accuracy of the label with p > 1/2
            labels = as_targets(yq, prediction.mean)
            correct = ((prediction.mean > 0.5).to(yq.dtype) == labels).to(weights.dtype)
            accuracy = per_task(correct.reshape(*correct.shape[:2], -1).mean(-1))
        return TaskMetrics(nll=nll, mse=mse, accuracy=accuracy, coverage=coverage, points=counts)
