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
  :mod:`hierbayes.inference.evaluation.arviz_bridge`);
* **coverage** of the central 50% and 90% predictive intervals (regression);
* **distance to the reference**, per task, between Gaussian fits
  :math:`\mathcal N(\mu_1,\Sigma_1)` (approximation) and :math:`\mathcal N(\mu_2,\Sigma_2)`
  (reference):

  - the posterior-mean error in units of the reference's standard deviations,
    :math:`z_{jd} = (\mu_{1,jd}-\mu_{2,jd})/\sigma_{2,jd}`, summarised as its root mean square
    over parameters and tasks (``mean_error_sd``) and its largest magnitude;
  - the 2-Wasserstein distance (Givens & Shortt 1984; Dowson & Landau 1982)

    .. math::

        W_2^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
                - 2\,(\Sigma_2^{1/2}\Sigma_1\Sigma_2^{1/2})^{1/2}\big),

    with symmetric square roots from ``eigh`` (negative round-off eigenvalues set to 0). A
    point mass has :math:`\Sigma_1 = 0`, so :math:`W_2^2 = \lVert\mu_1-\mu_2\rVert^2 +
    \operatorname{tr}\Sigma_2`.

  The Gaussian fit of a posterior with a ``covariance()`` method (Laplace, mean-field, exact)
  is its own mean and covariance; of NUTS draws, their sample mean and covariance (all draws);
  of anything else, the moments of ``num_chains·num_draws`` draws.
* **wall time**: seconds to compute the approximation of these tasks given :math:`\hat\theta`
  (``wall_times`` or the posterior's ``wall_time``; meta-training excluded).

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

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.inference.evaluation.metrics import evaluate_posterior
from hierbayes.inference.posteriors.base import PointMassPosterior, TaskPosterior
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "ComparisonResult",
    "ReferenceNotConvergedWarning",
    "compare_approximations",
    "gaussian_fit",
    "symmetric_sqrt",
    "wasserstein2_gaussian",
]

#: The default reference, then the fallback when it is absent.
_REFERENCE_ORDER = ("nuts_numpyro", "nuts_pyro")


class ReferenceNotConvergedWarning(UserWarning):
    r"""The reference posterior's :math:`\hat R` exceeds its threshold on some task."""


# -- Gaussian geometry ---------------------------------------------------------------------------


def symmetric_sqrt(matrix: Tensor) -> Tensor:
    r"""The symmetric positive semi-definite square root :math:`V\sqrt{\max(\Lambda,0)}V^\top`
    of symmetric ``matrix`` ``(..., D, D)`` (symmetrised first; ``eigh``)."""
    sym = 0.5 * (matrix + matrix.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(sym)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)


def wasserstein2_gaussian(
    mean1: Tensor,
    cov1: Tensor | None,
    mean2: Tensor,
    cov2: Tensor | None,
    *,
    sqrt_cov2: Tensor | None = None,
) -> Tensor:
    r"""The 2-Wasserstein distance between :math:`\mathcal N(\mu_1,\Sigma_1)` and
    :math:`\mathcal N(\mu_2,\Sigma_2)`, batched over leading dimensions.

    .. math::

        W_2^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
                - 2\operatorname{tr}\big(\Sigma_2^{1/2}\Sigma_1\Sigma_2^{1/2}\big)^{1/2}

    Parameters
    ----------
    mean1, mean2:
        ``(..., D)``.
    cov1, cov2:
        ``(..., D, D)`` symmetric positive semi-definite, or ``None`` for a point mass
        (:math:`\Sigma = 0`).
    sqrt_cov2:
        :math:`\Sigma_2^{1/2}` if already computed (:func:`symmetric_sqrt`).

    Returns
    -------
    ``(...)`` distances (the square root of the clamped-at-zero :math:`W_2^2`).
    """
    w2sq = (mean1 - mean2).square().sum(-1)
    if cov1 is not None:
        w2sq = w2sq + cov1.diagonal(dim1=-2, dim2=-1).sum(-1)
    if cov2 is not None:
        w2sq = w2sq + cov2.diagonal(dim1=-2, dim2=-1).sum(-1)
    if cov1 is not None and cov2 is not None:
        root2 = symmetric_sqrt(cov2) if sqrt_cov2 is None else sqrt_cov2
        middle = root2 @ cov1 @ root2
        evals = torch.linalg.eigvalsh(0.5 * (middle + middle.transpose(-1, -2)))
        w2sq = w2sq - 2 * evals.clamp_min(0).sqrt().sum(-1)
    return w2sq.clamp_min(0).sqrt()


def gaussian_fit(
    posterior: TaskPosterior, draws: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    r"""Mean ``(T, D)`` and covariance ``(T, D, D)`` of a Gaussian fit to ``posterior``.

    A point mass gives ``None`` for the covariance (zero); a posterior with ``covariance()``
    its own moments; :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` the sample moments
    of all its draws; anything else the sample moments of ``draws`` ``(..., T, D)``.
    """
    if isinstance(posterior, PointMassPosterior):
        return posterior.mean, None
    if isinstance(posterior, SamplePosterior):
        return _moments(posterior.draws)
    covariance = getattr(posterior, "covariance", None)
    if callable(covariance):
        try:
            return posterior.mean, covariance()
        except NotImplementedError:
            pass
    if draws is None:
        raise ValueError(
            f"{type(posterior).__name__} has no covariance(); pass draws for its sample moments"
        )
    mean, cov = _moments(draws)
    if bool((cov.diagonal(dim1=-2, dim2=-1) == 0).all()):
        return mean, None
    return mean, cov


def _moments(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and (maximum-likelihood) covariance over all leading dims of ``(..., T, D)``."""
    T, D = draws.shape[-2:]
    flat = draws.reshape(-1, T, D).double()
    mean = flat.mean(0)
    centred = flat - mean
    cov = torch.einsum("std,ste->tde", centred, centred) / flat.shape[0]
    return mean.to(draws.dtype), cov.to(draws.dtype)


# -- the comparison ----------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    r"""What :func:`compare_approximations` returns.

    Attributes
    ----------
    table:
        One row per approximation (in the order given): plain floats, ints, lists and
        ``None``; see :func:`compare_approximations` for the columns.
    per_task:
        Per approximation, per-task values: ``lpd``, ``coverage_50``, ``coverage_90``,
        ``mean_error_sd`` (root mean square over parameters), ``w2``.
    reference:
        The reference's name, or ``None``.
    reference_flagged:
        Tasks (indices) on which the reference's :math:`\hat R` exceeds its threshold.
    inference_data:
        Per approximation, its ``arviz.InferenceData`` on the held-out tasks.
    figures:
        Per approximation, ``{"forest": path, "posterior": path}`` once :meth:`save_figures`
        has run.
    settings:
        Draws, chains, levels and seed of the comparison.
    """

    table: dict[str, dict[str, Any]]
    per_task: dict[str, dict[str, list[float | None]]]
    reference: str | None
    reference_flagged: list[int]
    inference_data: dict[str, Any]
    settings: dict[str, Any]
    figures: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``metrics.json``: NaN and infinities become ``None``."""
        approximations: dict[str, Any] = {}
        for name, row in self.table.items():
            entry = dict(row)
            entry["per_task"] = self.per_task.get(name, {})
            if name in self.figures:
                entry["figures"] = dict(self.figures[name])
            approximations[name] = entry
        return _plain(
            {
                "reference": self.reference,
                "reference_flagged": list(self.reference_flagged),
                "settings": dict(self.settings),
                "approximations": approximations,
            }
        )

    def format(self) -> str:
        """A printable table, one line per approximation."""
        header = (
            f"{'approximation':22s} {'lpd/pt':>8s} {'ELPD ± se':>17s} {'Δ ± dse':>15s} "
            f"{'cov50':>6s} {'cov90':>6s} {'μ err/sd':>9s} {'W2':>8s} {'R-hat':>7s} {'time s':>8s}"
        )
        lines = [header, "-" * len(header)]
        for name, row in self.table.items():
            mark = " (ref)" if row.get("is_reference") else ""
            rhat = row.get("rhat_max")
            lines.append(
                f"{(name + mark)[:22]:22s} {_num(row['lpd'], 8, 3)} "
                f"{_pm(row['elpd'], row['elpd_se'], 17)} "
                f"{_pm(row['elpd_diff'], row['elpd_dse'], 15)} "
                f"{_num(row.get('coverage_50'), 6, 2)} {_num(row.get('coverage_90'), 6, 2)} "
                f"{_num(row.get('mean_error_sd'), 9, 3)} {_num(row.get('w2'), 8, 3)} "
                f"{_num(rhat, 7, 3)} {_num(row.get('wall_time'), 8, 2)}"
            )
        if self.reference is None:
            lines.append("no reference: distance columns are empty")
        else:
            lines.append(f"reference: {self.reference}")
        if self.reference_flagged:
            lines.append(
                f"WARNING: the reference {self.reference!r} has R-hat above "
                f"{self.settings.get('rhat_threshold', 1.01)} on task(s) {self.reference_flagged}; "
                "its distances are not trustworthy there"
            )
        return "\n".join(lines)

    def save_figures(
        self,
        folder: str | Path,
        *,
        prefix: str = "",
        task: int | None = None,
        parameters: Sequence[str] | None = None,
    ) -> dict[str, dict[str, str]]:
        """Save ``az.plot_forest`` (all approximations, one task) and one ``az.plot_posterior``
        per approximation as PNG files in ``folder``; return and remember their paths."""
        from hierbayes.inference.evaluation.arviz_bridge import plot_forest, plot_posterior

        out = Path(folder)
        forest = plot_forest(
            self.inference_data,
            out / f"{prefix}forest.png",
            task=task,
            parameters=parameters,
            title=f"{prefix.rstrip('_')} posterior intervals (90% HDI)".strip(),
        )
        reference = self.inference_data.get(self.reference) if self.reference else None
        for name, idata in self.inference_data.items():
            posterior = plot_posterior(
                idata,
                out / f"{prefix}posterior_{name}.png",
                task=task,
                parameters=parameters,
                reference=reference if name != self.reference else None,
                reference_name=self.reference or "reference",
            )
            self.figures[name] = {"forest": str(forest), "posterior": str(posterior)}
        return self.figures


def _num(value: Any, width: int, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}s}"
    return f"{value:>{width}.{digits}f}"


def _pm(value: Any, se: Any, width: int) -> str:
    if value is None or not math.isfinite(float(value)):
        return f"{'-':>{width}s}"
    return f"{f'{value:.2f} ± {se:.2f}':>{width}s}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    try:
        return _plain(float(value))
    except (TypeError, ValueError):
        return str(value)


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


_DEFAULT = "nuts_numpyro"


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
        ``{name: posterior}``, each a :class:`~hierbayes.inference.TaskPosterior` of the ``T``
        tasks of ``tasks`` (adapted to their support sets with the same :math:`\hat\theta`).
    tasks:
        The held-out tasks with query sets of equal size ``(T, M, ...)``.
    reference:
        The name of the reference approximation. The default, ``"nuts_numpyro"``, falls back
        to ``"nuts_pyro"`` and then to no reference when absent; an explicit name must be
        present; ``None`` computes no distances.
    num_draws, num_chains:
        Draws per chain for the ArviZ data and the ELPD (MCMC posteriors keep their own
        chains, thinned to ``num_draws``; others get ``num_chains`` chains of independent
        draws, Gaussian ones with common random numbers).
    levels:
        The two central predictive-interval levels whose coverage is reported.
    seed:
        Seeds the draws.
    wall_times:
        Seconds per approximation, overriding each posterior's ``wall_time`` attribute.
    predict_options:
        Per approximation, keywords for its ``predict`` (e.g. ``{"exact": {"method":
        "linearized"}}``).

    Returns
    -------
    :class:`ComparisonResult` whose ``table`` rows hold ``lpd`` (mean over tasks of the
    per-point log predictive density) and ``lpd_ci95``, ``mse`` or ``accuracy``, ``elpd``,
    ``elpd_se``, ``elpd_diff``, ``elpd_dse``, ``elpd_rank``, ``stacking_weight``,
    ``coverage_50`` and ``coverage_90`` (named after ``levels``), ``mean_error_sd``,
    ``mean_error_sd_max``, ``w2``, ``w2_max``, ``wall_time``, ``num_draws``, ``is_reference``
    and, for MCMC posteriors, ``rhat_max``, ``ess_bulk_min``, ``flagged``, ``divergences``.

    Warns
    -----
    ReferenceNotConvergedWarning
        When the reference is an MCMC posterior with flagged tasks.
    """
    from hierbayes.inference.evaluation.arviz_bridge import (
        compare_elpd,
        heldout_pointwise,
        to_inference_data,
    )

    names = list(approximations)
    if not names:
        raise ValueError("compare_approximations needs at least one approximation")
    for name, posterior in approximations.items():
        if posterior.num_tasks != tasks.num_tasks:
            raise ValueError(
                f"approximation {name!r} covers {posterior.num_tasks} tasks but the batch has "
                f"{tasks.num_tasks}"
            )
    ref_name = _resolve_reference(reference, names, default=reference == _DEFAULT)
    options = {k: dict(v) for k, v in (predict_options or {}).items()}
    times = dict(wall_times or {})

    idatas: dict[str, Any] = {}
    draws: dict[str, Tensor] = {}
    for name in names:
        idatas[name] = to_inference_data(
            approximations[name],
            tasks,
            num_draws=num_draws,
            num_chains=num_chains,
            seed=seed,
            name=name,
            wall_time=times.get(name),
        )
        draws[name] = torch.tensor(np.array(idatas[name].posterior["phi"].values))
    pointwise = {name: heldout_pointwise(idatas[name]) for name in names}
    sizes = {name: int(d.shape[0] * d.shape[1]) for name, d in draws.items()}
    elpd = compare_elpd(pointwise, num_samples=sizes)

    ref_fit: tuple[Tensor, Tensor | None] | None = None
    ref_sqrt: Tensor | None = None
    ref_sd: Tensor | None = None
    flagged: list[int] = []
    threshold = 1.01
    if ref_name is not None:
        ref_post = approximations[ref_name]
        ref_fit = gaussian_fit(ref_post, draws[ref_name])
        cov2 = ref_fit[1]
        if cov2 is None:
            raise ValueError(f"the reference {ref_name!r} is a point mass; it needs a spread")
        cov2 = cov2.double()
        ref_sqrt = symmetric_sqrt(cov2)
        ref_sd = cov2.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        if isinstance(ref_post, SamplePosterior):
            flagged = ref_post.flagged
            threshold = ref_post.rhat_threshold
            if flagged:
                warnings.warn(
                    f"the reference {ref_name!r} has R-hat above {threshold} on task(s) "
                    f"{flagged} (max R-hat {[round(float(v), 4) for v in ref_post.rhat_max]}); "
                    "its distances are reported but flagged. Run longer chains.",
                    ReferenceNotConvergedWarning,
                    stacklevel=2,
                )

    lo, hi = levels
    table: dict[str, dict[str, Any]] = {}
    per_task: dict[str, dict[str, list[float | None]]] = {}
    for name in names:
        posterior = approximations[name]
        metrics = evaluate_posterior(posterior, tasks, levels=levels, **options.get(name, {}))
        lpd_tasks = -metrics.nll.double()
        row: dict[str, Any] = {
            "lpd": float(lpd_tasks.mean()),
            "lpd_ci95": _ci95(lpd_tasks),
        }
        if metrics.mse is not None:
            row["mse"] = float(metrics.mse.double().mean())
        if metrics.accuracy is not None:
            row["accuracy"] = float(metrics.accuracy.double().mean())
        e = elpd[name]
        row.update(
            elpd=e["elpd"],
            elpd_se=e["se"],
            elpd_diff=e["elpd_diff"],
            elpd_dse=e["dse"],
            elpd_rank=e["rank"],
            stacking_weight=e["weight"],
        )
        tasks_row: dict[str, list[float | None]] = {"lpd": _list(lpd_tasks)}
        for level, key in (
            (lo, f"coverage_{round(100 * lo)}"),
            (hi, f"coverage_{round(100 * hi)}"),
        ):
            cov = metrics.coverage.get(level)
            row[key] = None if cov is None else float(cov.double().mean())
            tasks_row[key] = [] if cov is None else _list(cov.double())
        if ref_fit is not None and ref_sd is not None:
            mean1, cov1 = gaussian_fit(posterior, draws[name])
            z = (mean1.double() - ref_fit[0].double()) / ref_sd
            rms = z.square().mean(-1).sqrt()
            w2 = wasserstein2_gaussian(
                mean1.double(),
                None if cov1 is None else cov1.double(),
                ref_fit[0].double(),
                ref_fit[1].double() if ref_fit[1] is not None else None,
                sqrt_cov2=ref_sqrt,
            )
            row.update(
                mean_error_sd=float(z.square().mean().sqrt()),
                mean_error_sd_max=float(z.abs().max()),
                w2=float(w2.mean()),
                w2_max=float(w2.max()),
            )
            tasks_row["mean_error_sd"] = _list(rms)
            tasks_row["w2"] = _list(w2)
        else:
            row.update(mean_error_sd=None, mean_error_sd_max=None, w2=None, w2_max=None)
        seconds = times.get(name, getattr(posterior, "wall_time", math.nan))
        row["wall_time"] = float(seconds) if seconds is not None else None
        row["num_draws"] = sizes[name]
        row["is_reference"] = name == ref_name
        if isinstance(posterior, SamplePosterior):
            summary = posterior.summary()
            row["rhat_max"] = max(
                (v for v in summary["rhat_max"] if math.isfinite(v)), default=math.nan
            )
            row["ess_bulk_min"] = min(summary["ess_bulk_min"])
            row["flagged"] = summary["flagged"]
            row["divergences"] = sum(summary.get("divergences", []))
            row["engine"] = posterior.engine
            tasks_row["rhat_max"] = summary["rhat_max"]
            tasks_row["ess_bulk_min"] = summary["ess_bulk_min"]
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
            elpd="held-out: sum over query points of log mean_s p(y | phi_s); az.compare "
            "ranks, dse and stacking weights",
        ),
    )


def _ci95(values: Tensor) -> float:
    n = values.numel()
    return 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else math.nan


def _list(values: Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values.flatten()]
