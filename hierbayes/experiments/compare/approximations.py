r"""The rows every ``compare`` problem shares, and how one problem is scored.

Rows: ``maml`` (the point mass), ``laplace_<curvature>`` (:func:`laplace_approximations`),
``meanfield_vi``, ``nuts_pyro`` and ``nuts_numpyro`` (the reference), all from the same
meta-trained :math:`\hat\theta`; :func:`score_problem` compares them with
:func:`~hierbayes.inference.diagnostics.compare.compare_approximations` and saves the figures.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hierbayes.experiments.compare.settings import CompareSettings
from hierbayes.inference import FitResult
from hierbayes.inference.diagnostics.compare import ComparisonResult, compare_approximations
from hierbayes.inference.posteriors import TaskPosterior
from hierbayes.inference.posteriors.laplace import laplace_posterior
from hierbayes.inference.references.meanfield import meanfield_vi
from hierbayes.inference.references.nuts import nuts_numpyro, nuts_pyro
from hierbayes.tasks import TaskBatch

__all__ = ["laplace_approximations", "score_problem", "shared_approximations", "timed"]


def laplace_approximations(
    result: FitResult, tasks: TaskBatch
) -> dict[str, tuple[TaskPosterior, float]]:
    r"""The Laplace rows: ``{"laplace_<curvature>": (posterior, seconds)}`` for ``tasks``.

    The single place where the Laplace rows join the comparison: one
    :class:`~hierbayes.inference.posteriors.LaplacePosterior` per curvature (``ggn``, ``kfac``, ``diag``,
    and ``full`` where ``D <= 200``: the linear problem) with the wall time it took. Rows are
    compared with their default ``predict`` (linearised for Laplace).

    Each row is the classical approximation: centred at the task's posterior mode (three Newton
    steps with the row's own curvature, from MAML's adapted point; one step is exact for the
    linear model), with that curvature's covariance.
    """
    density = result.guide.density
    curvatures = ["ggn", "kfac", "diag"]
    if density.structure.num_params <= 200:
        curvatures.append("full")
    start = result.adapt(tasks).mean
    rows: dict[str, tuple[TaskPosterior, float]] = {}
    for curvature in curvatures:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an indefinite Hessian is repaired
            posterior = laplace_posterior(
                density,
                result.params,
                start,
                tasks.support_x,
                tasks.support_y,
                tasks.support_mask,
                curvature=curvature,
                refine_steps=3,
            )
        rows[f"laplace_{curvature}"] = (posterior, time.perf_counter() - started)
    return rows


def timed(make: Callable[[], TaskPosterior]) -> tuple[TaskPosterior, float]:
    """``make()`` and the seconds it took."""
    started = time.perf_counter()
    posterior = make()
    return posterior, time.perf_counter() - started


def shared_approximations(
    result: FitResult,
    heldout: TaskBatch,
    settings: CompareSettings,
    *,
    numpyro_samples: int,
    pyro_samples: int,
    pyro_chains: int,
    max_tree_depth: int = 10,
) -> tuple[dict[str, TaskPosterior], dict[str, float]]:
    """The rows every problem shares: maml, the Laplace rows, mean-field VI and both NUTS.

    Returns the posteriors and their wall times in seconds (the NUTS and mean-field rows carry
    their own ``wall_time``, which
    :func:`~hierbayes.inference.diagnostics.compare.compare_approximations` reads).
    """
    density, params, seed = result.guide.density, result.params, settings.seed
    posteriors: dict[str, TaskPosterior] = {}
    times: dict[str, float] = {}
    posteriors["maml"], times["maml"] = timed(lambda: result.adapt(heldout))
    for name, (posterior, seconds) in laplace_approximations(result, heldout).items():
        posteriors[name], times[name] = posterior, seconds
    posteriors["meanfield_vi"] = meanfield_vi(
        density, params, heldout, num_steps=settings.meanfield_steps, seed=seed
    )
    posteriors["nuts_pyro"] = nuts_pyro(
        density,
        params,
        heldout,
        num_warmup=pyro_samples,
        num_samples=pyro_samples,
        num_chains=pyro_chains,
        seed=seed,
        max_tree_depth=max_tree_depth,
    )
    posteriors["nuts_numpyro"] = nuts_numpyro(
        result.model,
        params,
        heldout,
        num_warmup=numpyro_samples,
        num_samples=numpyro_samples,
        num_chains=settings.num_chains,
        seed=seed,
        max_tree_depth=max_tree_depth,
    )
    return posteriors, times


def _problem_report(
    comparison: ComparisonResult, result: FitResult, extra: Mapping[str, Any]
) -> dict[str, Any]:
    report = comparison.to_dict()
    report["meta_training"] = {
        "meta_steps": len(result.history),
        "final_loss": float(sum(result.history[-20:]) / max(1, len(result.history[-20:]))),
        "seconds": round(result.wall_time, 2),
        "globals": {
            name: (
                value.tolist() if value.numel() <= 8 else f"tensor of shape {tuple(value.shape)}"
            )
            for name, value in result.params.items()
        },
    }
    report.update(extra)
    return report


def score_problem(
    posteriors: dict[str, TaskPosterior],
    times: dict[str, float],
    heldout: TaskBatch,
    result: FitResult,
    settings: CompareSettings,
    out: Path,
    name: str,
    problem: str,
) -> tuple[dict[str, Any], ComparisonResult]:
    """Score one problem's approximations against NumPyro's NUTS, save figures, report."""
    comparison = compare_approximations(
        posteriors,
        heldout,
        reference="nuts_numpyro",
        num_draws=settings.draws_per_chain,
        num_chains=settings.num_chains,
        seed=settings.seed,
        wall_times=times,
    )
    comparison.save_figures(out, prefix=f"{name}_")
    return _problem_report(comparison, result, {"problem": problem}), comparison
