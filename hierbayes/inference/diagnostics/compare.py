r"""Compare task-posterior approximations on held-out tasks, against a NUTS reference.

:func:`compare_approximations` takes approximations of the same held-out tasks' posteriors
:math:`p(\phi_j \mid x^s_j, y^s_j, \hat\theta)` (a MAML point mass, Laplace Gaussians, mean-field
VI, NUTS draws, the exact posterior where there is one) and scores each one on the tasks' query
sets and against a reference posterior (by default NumPyro's NUTS):

* **lpd**: the mean over tasks of the log predictive density per query point,
  :math:`\frac1M\sum_m \log q(y^q_{jm}\mid x^q_{jm})`, from the approximation's own
  ``predict`` (e.g. the linearised predictive of a Laplace posterior);
* **ELPD** (``az.compare``): :math:`\sum_{j,m}\log\frac1S\sum_s p(y^q_{jm}\mid\phi^{(s)}_j)` from
  ``S`` draws of :math:`\phi`, with its standard error, the difference to the best and its
  paired standard error, and stacking weights (see
  :mod:`hierbayes.inference.diagnostics.arviz_bridge`);
* **coverage** of the central 50% and 90% predictive intervals (regression);
* **distance to the reference**, per task, between Gaussian fits
  :math:`\mathcal N(\mu_1,\Sigma_1)` (approximation) and :math:`\mathcal N(\mu_2,\Sigma_2)`
  (reference):

  - the posterior-mean error in units of the reference's standard deviations,
    :math:`z_{jd} = (\mu_{1,jd}-\mu_{2,jd})/\sigma_{2,jd}`, summarised as its root mean square
    over parameters and tasks (``mean_error_sd``) and its largest magnitude;
  - the 2-Wasserstein distance :math:`W_2` between the two Gaussians
    (:mod:`hierbayes.inference.diagnostics.wasserstein`).

  The Gaussian fit of a posterior that states its covariance (Laplace, mean-field, exact) is
  its own mean and covariance; of NUTS draws, their sample mean and covariance (all draws); of
  anything else, the moments of ``num_chains·num_draws`` draws
  (:func:`~hierbayes.inference.diagnostics.readout.gaussian_fit`).
* **wall time**: seconds to compute the approximation of these tasks given :math:`\hat\theta`
  (``wall_times`` or the posterior's recorded ``wall_time``; meta-training excluded).

A reference whose :math:`\hat R` exceeds 1.01 on some task is reported in
``reference_flagged`` and a :class:`ReferenceNotConvergedWarning` is issued: its distances are
computed but must not be trusted silently.

References
----------
1. Givens & Shortt (1984). A class of Wasserstein metrics for probability distributions.
   Michigan Mathematical Journal 31.
2. Vehtari, Gelman & Gabry (2017). Practical Bayesian model evaluation using leave-one-out
   cross-validation and WAIC. Statistics and Computing.
3. Gneiting & Raftery (2007). Strictly proper scoring rules, prediction, and estimation. JASA.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.inference.diagnostics.columns import (
    as_list,
    in_sample_columns,
    predictive_columns,
    sampler_columns,
)
from hierbayes.inference.diagnostics.comparison import ComparisonResult
from hierbayes.inference.diagnostics.metrics import evaluate_posterior
from hierbayes.inference.diagnostics.readout import gaussian_fit, wall_time_of
from hierbayes.inference.diagnostics.wasserstein import symmetric_sqrt, wasserstein2_gaussian
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.samples import RHAT_THRESHOLD, SamplePosterior
from hierbayes.tasks.batch import TaskBatch

__all__ = ["ComparisonResult", "ReferenceNotConvergedWarning", "compare_approximations"]

#: The default reference, then the fallbacks when it is absent (full Bayes, then the fixed-
#: globals NUTS of either engine).
_REFERENCE_ORDER = ("nuts_numpyro", "full_bayes", "nuts_pyro")
_DEFAULT = "nuts_numpyro"


class ReferenceNotConvergedWarning(UserWarning):
    r"""The reference posterior's :math:`\hat R` exceeds its threshold on some task."""


def _resolve_reference(reference: str | None, names: Sequence[str], default: bool) -> str | None:
    if reference is not None and reference in names:
        return reference
    if not default:
        if reference is None:
            return None
        raise KeyError(f"reference {reference!r} is not among the approximations {list(names)}")
    for candidate in _REFERENCE_ORDER:
        if candidate in names:
            return candidate
    return None


@dataclass(frozen=True)
class _ReferenceFit:
    """The reference's Gaussian fit in float64, with what every distance to it reuses."""

    mean: Tensor  # (T, D)
    covariance: Tensor  # (T, D, D)
    sqrt_covariance: Tensor  # (T, D, D)
    sd: Tensor  # (T, D)

    @classmethod
    def of(cls, name: str, posterior: TaskPosterior, draws: Tensor) -> _ReferenceFit:
        mean, cov = gaussian_fit(posterior, draws)
        if cov is None:
            raise ValueError(f"the reference {name!r} is a point mass; it needs a spread")
        cov = cov.double()
        return cls(
            mean.double(),
            cov,
            symmetric_sqrt(cov),
            cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt(),
        )

    def distances(
        self, posterior: TaskPosterior, draws: Tensor
    ) -> tuple[dict[str, float], dict[str, list[float | None]]]:
        """The distance columns of ``posterior``'s row and its per-task values."""
        mean1, cov1 = gaussian_fit(posterior, draws)
        z = (mean1.double() - self.mean) / self.sd
        w2 = wasserstein2_gaussian(
            mean1.double(),
            None if cov1 is None else cov1.double(),
            self.mean,
            self.covariance,
            sqrt_cov2=self.sqrt_covariance,
        )
        row = {
            "mean_error_sd": float(z.square().mean().sqrt()),
            "mean_error_sd_max": float(z.abs().max()),
            "w2": float(w2.mean()),
            "w2_max": float(w2.max()),
        }
        return row, {"mean_error_sd": as_list(z.square().mean(-1).sqrt()), "w2": as_list(w2)}


def _check_reference(name: str, posterior: TaskPosterior) -> tuple[list[int], float]:
    """The reference's flagged tasks and :math:`\\hat R` threshold, warning when any is flagged."""
    if not isinstance(posterior, SamplePosterior):
        return [], RHAT_THRESHOLD
    flagged, threshold = posterior.flagged, posterior.rhat_threshold
    globals_flagged = getattr(posterior, "globals_flagged", [])
    if globals_flagged:
        warnings.warn(
            f"the reference {name!r} has R-hat above {threshold} on the global site(s) "
            f"{globals_flagged}; its distances are reported but not trustworthy. Run longer "
            "chains.",
            ReferenceNotConvergedWarning,
            stacklevel=3,
        )
    if flagged:
        warnings.warn(
            f"the reference {name!r} has R-hat above {threshold} on task(s) {flagged} (max R-hat "
            f"{[round(float(v), 4) for v in posterior.rhat_max_per_task]}); its distances are reported but "
            "flagged. Run longer chains.",
            ReferenceNotConvergedWarning,
            stacklevel=3,
        )
    return flagged, threshold


def compare_approximations(
    approximations: Mapping[str, TaskPosterior],
    tasks: TaskBatch,
    *,
    reference: str | None = _DEFAULT,
    num_draws: int = 250,
    num_chains: int = 4,
    levels: tuple[float, float] = (0.5, 0.9),
    seed: int = 0,
    wall_times: Mapping[str, float] | None = None,
    predict_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ComparisonResult:
    r"""Score approximations of the held-out tasks' posteriors; see the module docstring.

    Parameters
    ----------
    approximations:
        ``{name: posterior}``, each a :class:`~hierbayes.inference.posteriors.TaskPosterior` of the ``T``
        tasks of ``tasks`` (adapted to their support sets with the same :math:`\hat\theta`). An
        MCMC posterior without convergence diagnostics gets them computed here.
    tasks:
        The held-out tasks with query sets ``(T, M, ...)`` (unequal sizes padded and masked).
        Tasks without a query set (groups as tasks, all data in the support set) are scored in
        sample: the ELPD columns are PSIS-LOO's (``az.loo``, with ``p_loo`` and
        ``pareto_k_max``), and ``lpd``, ``mse`` and the coverages are ``None``.
    reference:
        The name of the reference approximation. The default, ``"nuts_numpyro"``, falls back
        to ``"full_bayes"`` (:func:`~hierbayes.inference.references.full_bayes.nuts_full_bayes`,
        the gold standard for groups), then to ``"nuts_pyro"`` and then to no reference when
        absent; an explicit name must be present; ``None`` computes no distances.
    num_draws, num_chains:
        Draws per chain for the ArviZ data and the ELPD (MCMC posteriors keep their own
        chains, thinned to ``num_draws``; others get ``num_chains`` chains of independent
        draws, Gaussian ones with common random numbers).
    levels:
        The two central predictive-interval levels whose coverage is reported.
    seed:
        Seeds the draws.
    wall_times:
        Seconds per approximation, overriding each posterior's recorded ``wall_time``.
    predict_options:
        Per approximation, keywords for its ``predict`` (e.g. ``{"exact": {"method":
        "linearized"}}``).

    Returns
    -------
    :class:`~hierbayes.inference.diagnostics.comparison.ComparisonResult` whose ``table`` rows
    hold ``lpd`` (mean over tasks of the per-point log predictive density) and ``lpd_ci95``,
    ``mse`` or ``accuracy``, ``elpd``, ``elpd_se``, ``elpd_diff``, ``elpd_dse``, ``elpd_rank``,
    ``stacking_weight``, ``coverage_50`` and ``coverage_90`` (named after ``levels``),
    ``mean_error_sd``, ``mean_error_sd_max``, ``w2``, ``w2_max``, ``wall_time``, ``num_draws``,
    ``is_reference`` and, for MCMC posteriors, ``rhat_max``, ``ess_bulk_min``, ``flagged``,
    ``divergences``, ``engine`` (and for a full-Bayes reference ``globals_rhat_max``,
    ``globals_ess_bulk_min``, ``globals_flagged``).

    Warns
    -----
    ReferenceNotConvergedWarning
        When the reference is an MCMC posterior with flagged tasks.
    """
    from hierbayes.inference.diagnostics.arviz_bridge import (
        compare_elpd,
        compare_loo,
        convergence_diagnostics,
        heldout_pointwise,
        posterior_variable,
        to_inference_data,
    )

    names = list(approximations)
    if not names:
        raise ValueError("compare_approximations needs at least one approximation")
    posteriors: dict[str, TaskPosterior] = {}
    for name, posterior in approximations.items():
        if posterior.num_tasks != tasks.num_tasks:
            raise ValueError(
                f"approximation {name!r} covers {posterior.num_tasks} tasks but the batch has "
                f"{tasks.num_tasks}"
            )
        if isinstance(posterior, SamplePosterior) and not posterior.has_diagnostics:
            posterior = posterior.with_diagnostics(convergence_diagnostics(posterior.draws))
        posteriors[name] = posterior
    ref_name = _resolve_reference(reference, names, default=reference == _DEFAULT)
    options = {k: dict(v) for k, v in (predict_options or {}).items()}
    times = dict(wall_times or {})

    idatas: dict[str, Any] = {}
    draws: dict[str, Tensor] = {}
    for name in names:
        idatas[name] = to_inference_data(
            posteriors[name],
            tasks,
            num_draws=num_draws,
            num_chains=num_chains,
            seed=seed,
            name=name,
            wall_time=times.get(name),
        )
        draws[name] = torch.tensor(
            np.array(idatas[name].posterior[posterior_variable(idatas[name])].values)
        )
    sizes = {name: int(d.shape[0] * d.shape[1]) for name, d in draws.items()}
    in_sample = not tasks.has_query
    if in_sample:
        elpd = compare_loo(idatas)
    else:
        pointwise = {name: heldout_pointwise(idatas[name]) for name in names}
        elpd = compare_elpd(pointwise, num_samples=sizes)

    ref_fit: _ReferenceFit | None = None
    flagged: list[int] = []
    threshold = RHAT_THRESHOLD
    if ref_name is not None:
        ref_fit = _ReferenceFit.of(ref_name, posteriors[ref_name], draws[ref_name])
        flagged, threshold = _check_reference(ref_name, posteriors[ref_name])

    table: dict[str, dict[str, Any]] = {}
    per_task: dict[str, dict[str, list[float | None]]] = {}
    for name in names:
        posterior = posteriors[name]
        if in_sample:
            row, tasks_row = in_sample_columns(elpd[name], levels)
        else:
            metrics = evaluate_posterior(posterior, tasks, levels=levels, **options.get(name, {}))
            row, tasks_row = predictive_columns(metrics, elpd[name], levels)
        if ref_fit is not None:
            distance_row, distance_tasks = ref_fit.distances(posterior, draws[name])
            row.update(distance_row)
            tasks_row.update(distance_tasks)
        else:
            row.update(mean_error_sd=None, mean_error_sd_max=None, w2=None, w2_max=None)
        row["wall_time"] = float(times.get(name, wall_time_of(posterior)))
        row["num_draws"] = sizes[name]
        row["is_reference"] = name == ref_name
        if isinstance(posterior, SamplePosterior):
            sampler_row, sampler_tasks = sampler_columns(posterior)
            row.update(sampler_row)
            tasks_row.update(sampler_tasks)
        table[name] = row
        per_task[name] = tasks_row
    return ComparisonResult(
        table=table,
        per_task=per_task,
        reference=ref_name,
        reference_flagged=flagged,
        inference_data=idatas,
        settings=dict(
            num_draws=num_draws,
            num_chains=num_chains,
            levels=list(levels),
            seed=seed,
            num_tasks=tasks.num_tasks,
            rhat_threshold=threshold,
            elpd="in sample (no query set): PSIS-LOO of the support points, az.loo; az.compare "
            "ranks, dse and stacking weights"
            if in_sample
            else "held-out: sum over query points of log mean_s p(y | phi_s); az.compare "
            "ranks, dse and stacking weights",
        ),
    )
