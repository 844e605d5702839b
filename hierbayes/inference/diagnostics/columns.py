r"""The columns of one row of :func:`~hierbayes.inference.diagnostics.compare.compare_approximations`'s
table: held-out predictive scores, ArviZ's ELPD, in-sample PSIS-LOO, and an MCMC posterior's
diagnostics; each with its per-task values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hierbayes.inference.diagnostics.metrics import TaskMetrics
from hierbayes.inference.posteriors.samples import SamplePosterior

__all__ = ["as_list", "in_sample_columns", "predictive_columns", "sampler_columns"]


def predictive_columns(
    metrics: TaskMetrics, elpd: Mapping[str, float], levels: tuple[float, float]
) -> tuple[dict[str, Any], dict[str, list[float | None]]]:
    """lpd (with its 95% interval), mse or accuracy, the ELPD columns and the coverages; and
    their per-task values."""
    lpd_tasks = -metrics.nll.double()
    row: dict[str, Any] = {"lpd": float(lpd_tasks.mean()), "lpd_ci95": _ci95(lpd_tasks)}
    per_task: dict[str, list[float | None]] = {"lpd": as_list(lpd_tasks)}
    if metrics.mse is not None:
        row["mse"] = float(metrics.mse.double().mean())
    if metrics.accuracy is not None:
        row["accuracy"] = float(metrics.accuracy.double().mean())
    row.update(_elpd_columns(elpd))
    for level in levels:
        key = f"coverage_{round(100 * level)}"
        cov = metrics.coverage.get(level)
        row[key] = None if cov is None else float(cov.double().mean())
        per_task[key] = [] if cov is None else as_list(cov.double())
    return row, per_task


def _elpd_columns(elpd: Mapping[str, float]) -> dict[str, Any]:
    """The ``az.compare`` columns of one row."""
    return {
        "elpd": elpd["elpd"],
        "elpd_se": elpd["se"],
        "elpd_diff": elpd["elpd_diff"],
        "elpd_dse": elpd["dse"],
        "elpd_rank": elpd["rank"],
        "stacking_weight": elpd["weight"],
    }


def in_sample_columns(
    elpd: Mapping[str, float], levels: tuple[float, float]
) -> tuple[dict[str, Any], dict[str, list[float | None]]]:
    """Tasks without a query set: no held-out lpd, mse or coverage; the ELPD columns are
    PSIS-LOO's, with ``p_loo`` and the largest Pareto k."""
    row: dict[str, Any] = {"lpd": None, "lpd_ci95": None}
    row.update(_elpd_columns(elpd), p_loo=elpd["p_loo"], pareto_k_max=elpd["pareto_k_max"])
    for level in levels:
        row[f"coverage_{round(100 * level)}"] = None
    return row, {}


def sampler_columns(
    posterior: SamplePosterior,
) -> tuple[dict[str, Any], dict[str, list[float | None]]]:
    """R-hat, ESS, flagged tasks, divergences and engine of an MCMC posterior."""
    summary = posterior.summary()
    row = {
        "rhat_max": max(
            (v for v in summary["rhat_max_per_task"] if math.isfinite(v)), default=math.nan
        ),
        "ess_bulk_min": summary["ess_bulk_min"],
        "flagged": summary["flagged"],
        "divergences": summary.get("divergences_total", sum(summary.get("divergences", []))),
        "engine": posterior.engine,
    }
    if "globals" in summary:  # full Bayes: the globals' diagnostics too
        rhats = [v for g in summary["globals"].values() for v in _flat(g.get("rhat", []))]
        esss = [v for g in summary["globals"].values() for v in _flat(g.get("ess_bulk", []))]
        row["globals_rhat_max"] = max(rhats, default=math.nan)
        row["globals_ess_bulk_min"] = min(esss, default=math.nan)
        row["globals_flagged"] = summary.get("globals_flagged", [])
    return row, {
        "rhat_max": summary["rhat_max_per_task"],
        "ess_bulk_min": summary["ess_bulk_min_per_task"],
    }


def _flat(value: Any) -> list[float]:
    """A float or a nested list of floats, as a flat list."""
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flat(item)]
    return [float(value)]


def _ci95(values: Tensor) -> float:
    n = values.numel()
    return 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else math.nan


def as_list(values: Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values.flatten()]
