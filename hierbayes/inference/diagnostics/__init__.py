r"""Diagnostics: per-task metrics, comparison of posterior approximations, and ArviZ.

* :func:`evaluate_posterior` and :class:`TaskMetrics`: held-out NLL, MSE or accuracy, interval
  coverage, with 95 % intervals over tasks (:func:`mean_ci95`);
* :func:`compare_approximations` and :class:`ComparisonResult`: point mass, Laplace, mean-field
  VI and NUTS side by side against a reference (held-out log predictive density, ``az.compare``
  ELPD, coverage, distances :func:`wasserstein2_gaussian`, R-hat);
* ArviZ (the one import path; ArviZ itself is imported only when one of these runs):
  :func:`to_inference_data`, :func:`convergence_diagnostics`, :func:`compare_elpd`,
  :func:`compare_loo`, :func:`heldout_pointwise`, :func:`plot_forest`, :func:`plot_posterior`,
  :func:`posterior_variable`, :func:`observed_variable`, :func:`parameter_names`
  (:mod:`~hierbayes.inference.diagnostics.arviz_bridge`).
"""

from typing import TYPE_CHECKING, Any

from hierbayes.inference.diagnostics.compare import (
    ComparisonResult,
    ReferenceNotConvergedWarning,
    compare_approximations,
)
from hierbayes.inference.diagnostics.metrics import TaskMetrics, evaluate_posterior, mean_ci95
from hierbayes.inference.diagnostics.wasserstein import wasserstein2_gaussian

if TYPE_CHECKING:
    from hierbayes.inference.diagnostics.arviz_bridge import (
        compare_elpd,
        compare_loo,
        convergence_diagnostics,
        heldout_pointwise,
        observed_variable,
        parameter_names,
        plot_forest,
        plot_posterior,
        posterior_variable,
        to_inference_data,
    )

#: The ArviZ bridge's names, imported (with ArviZ) when first used.
_ARVIZ = (
    "compare_elpd",
    "compare_loo",
    "convergence_diagnostics",
    "heldout_pointwise",
    "observed_variable",
    "parameter_names",
    "plot_forest",
    "plot_posterior",
    "posterior_variable",
    "to_inference_data",
)


def __getattr__(name: str) -> Any:
    if name in _ARVIZ:
        from hierbayes.inference.diagnostics import arviz_bridge

        return getattr(arviz_bridge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ComparisonResult",
    "ReferenceNotConvergedWarning",
    "TaskMetrics",
    "compare_approximations",
    "compare_elpd",
    "compare_loo",
    "convergence_diagnostics",
    "evaluate_posterior",
    "heldout_pointwise",
    "mean_ci95",
    "observed_variable",
    "parameter_names",
    "plot_forest",
    "plot_posterior",
    "posterior_variable",
    "to_inference_data",
    "wasserstein2_gaussian",
]
