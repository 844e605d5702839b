r"""The ArviZ bridge: task posteriors as ``arviz.InferenceData``, diagnostics, ELPD, figures.

This is the one module of hierbayes that imports ArviZ.

:func:`to_inference_data` turns any :class:`~hierbayes.inference.TaskPosterior` (a MAML point
mass, a Laplace or mean-field Gaussian, NUTS draws) and a batch of held-out tasks into an
``InferenceData`` with the groups

* ``posterior``: ``phi`` (chain, draw, task, parameter), the draws :math:`\phi^{(c,s)}_j`;
* ``posterior_predictive``: ``y`` (chain, draw, task, point[, output]), draws
  :math:`y \sim p(y\mid\phi^{(c,s)}_j, x^q_{jm})` at the query inputs;
* ``log_likelihood``: ``y`` (chain, draw, task, point), :math:`\log p(y^q_{jm}\mid
  \phi^{(c,s)}_j)` per query point;
* ``observed_data``: ``y`` (task, point[, output]), the query targets;
* ``constant_data``: ``x`` (task, point[, input]), the query inputs, and the global values the
  posterior was computed with: ``theta`` (parameter) and the others (``noise_scale``, ...)
  under their site names. This is where :math:`\hat\theta` is recorded;
* ``sample_stats`` (NUTS only): ``diverging`` (chain, draw, task).

Coordinates: ``task`` holds the batch's ``task_ids`` (else ``0..T-1``); ``parameter`` holds
names built from the network's :class:`~hierbayes.models.network.ParameterLayout`, the module's
parameter name and a row-major index, e.g. ``"0.weight[3,0]"``, ``"2.bias[7]"`` (``"phi[i]"``
for a model without a layout); ``point`` is ``0..M-1``. A target with one output per point is
stored without the ``output`` dimension. Non-MCMC posteriors get ``num_chains`` "chains" of
independent draws, so ArviZ's functions apply unchanged.

The ``log_likelihood`` group is per query point, as ``az.loo``, ``az.waic`` and ``az.compare``
expect. The query points never entered the posterior, so the held-out ELPD is the plain
Monte-Carlo log predictive density :math:`\sum_{j,m}\log\frac1S\sum_s p(y^q_{jm}\mid
\phi^{(s)}_j)`, with no leave-one-out correction: :func:`compare_elpd` gives ``az.compare``
those pointwise values (as precomputed ``ELPDData``), which ranks the approximations and
computes paired standard errors of their differences and stacking weights (Yao et al. 2018).
PSIS-LOO on these values would "remove" points that were never in the posterior.

References
----------
1. Kumar, Carroll, Hartikainen & Martin (2019). ArviZ a unified library for exploratory
   analysis of Bayesian models in Python. JOSS.
2. Vehtari, Gelman & Gabry (2017). Practical Bayesian model evaluation using leave-one-out
   cross-validation and WAIC. Statistics and Computing.
3. Yao, Vehtari, Simpson & Gelman (2018). Using stacking to average Bayesian predictive
   distributions. Bayesian Analysis.
4. Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021). Rank-normalization, folding, and
   localization: an improved R-hat. Bayesian Analysis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import arviz as az
import numpy as np
import torch
import xarray as xr
from arviz.stats.stats_utils import ELPDData
from torch import Tensor

from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.samples import (
    SamplePosterior,
    as_numpy,
    posterior_draws,
    thinning_index,
)
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "compare_elpd",
    "convergence_diagnostics",
    "default_parameters",
    "heldout_pointwise",
    "parameter_names",
    "plot_forest",
    "plot_posterior",
    "to_inference_data",
]

#: Draws of phi evaluated together when computing log likelihoods and predictive draws.
_CHUNK = 256


def parameter_names(density: Any, num_params: int) -> list[str]:
    """Names of the ``D`` entries of :math:`\\phi`: ``"<module parameter>[i,j]"`` from the
    network's layout (row-major), then ``"log_noise_scale"`` for a per-task noise scale (or
    ``"likelihood[i]"``); ``"phi[i]"`` without a layout."""
    layout = getattr(getattr(density, "network", None), "layout", None)
    if layout is None:
        layout = getattr(getattr(getattr(density, "model", None), "net", None), "layout", None)
    if layout is None or layout.num_params > num_params:
        return [f"phi[{i}]" for i in range(num_params)]
    names: list[str] = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        for index in np.ndindex(*tuple(shape)):
            names.append(f"{name}[{','.join(str(i) for i in index)}]")
    extra = num_params - len(names)  # the likelihood's per-task parameters follow the network's
    likelihood = getattr(density, "likelihood", None)
    if extra == 1 and getattr(likelihood, "per_task", False):
        names.append("log_noise_scale")
    else:
        names.extend(f"likelihood[{i}]" for i in range(extra))
    return names


def _task_coords(tasks: TaskBatch) -> list[int]:
    if tasks.task_ids is not None:
        return [int(i) for i in tasks.task_ids]
    return list(range(tasks.num_tasks))


def _target_layout(y: Tensor) -> tuple[Tensor, list[str]]:
    """``(T, M, ...)`` targets to ``(T, M)`` or ``(T, M, O)``, with their dims."""
    if y.dim() == 2:
        return y, ["task", "point"]
    if y.dim() == 3 and y.shape[-1] == 1:
        return y[..., 0], ["task", "point"]
    return y.reshape(*y.shape[:2], -1), ["task", "point", "output"]


def to_inference_data(
    posterior: TaskPosterior,
    tasks: TaskBatch,
    *,
    num_draws: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    name: str | None = None,
    wall_time: float | None = None,
) -> az.InferenceData:
    r"""An ``arviz.InferenceData`` of ``posterior`` on ``tasks``' query sets.

    Parameters
    ----------
    posterior:
        Any :class:`~hierbayes.inference.TaskPosterior` of the ``T`` tasks of ``tasks``
        (adapted to their support sets).
    tasks:
        The held-out tasks, with query sets ``(T, M, ...)`` of equal size (no query mask).
    num_draws, num_chains:
        Draws per chain and chains. MCMC posteriors keep their own chains, thinned to
        ``num_draws`` evenly spaced draws; other posteriors get ``num_chains`` chains of
        independent draws (see :func:`~hierbayes.inference.posteriors.samples.posterior_draws`).
    seed:
        Seeds the draws of :math:`\phi` and of the posterior predictive. Gaussian posteriors
        share their standard-normal draws for a given seed (common random numbers).
    name, wall_time:
        Recorded in the attributes (``approximation``, ``wall_time``).

    Returns
    -------
    ``InferenceData`` with the groups and coordinates of the module docstring.
    """
    xq, yq, mask = tasks.require_query("to_inference_data")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "to_inference_data needs query sets of equal size: ArviZ's pointwise log "
            "likelihood has no masked points. Pass tasks without a query mask (or with one "
            "that is all True)."
        )
    if posterior.num_tasks != tasks.num_tasks:
        raise ValueError(
            f"the posterior covers {posterior.num_tasks} tasks but the batch has "
            f"{tasks.num_tasks}; adapt the posterior to these tasks' support sets first"
        )
    density, params = posterior.density, posterior.params
    draws = posterior_draws(posterior, num_chains, num_draws, seed=seed)
    C, S, T, D = draws.shape
    xq = xq.to(draws.device)
    yq = yq.to(draws.device)
    flat = draws.reshape(C * S, T, D)
    log_lik: list[Tensor] = []
    predictive: list[Tensor] = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, C * S, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            n = chunk.shape[0]
            xs = xq.unsqueeze(0).expand(n, *xq.shape).reshape(n * T, *xq.shape[1:])
            ys = yq.unsqueeze(0).expand(n, *yq.shape).reshape(n * T, *yq.shape[1:])
            fn = density.predictive(params, chunk.reshape(n * T, D), xs)
            log_lik.append(fn.log_prob(ys).reshape(n, T, -1))
            predictive.append(fn.sample().reshape(n, T, *yq.shape[1:]))
    ll = torch.cat(log_lik).reshape(C, S, T, -1)
    observed, y_dims = _target_layout(yq)
    pp = torch.cat(predictive).reshape(C, S, *observed.shape)
    M = observed.shape[1]
    coords: dict[str, Any] = {
        "task": _task_coords(tasks),
        "parameter": parameter_names(density, D),
        "point": list(range(M)),
    }
    if len(y_dims) == 3:
        coords["output"] = list(range(observed.shape[2]))
    globals_ = dict(params)
    theta_of = getattr(getattr(density, "model", None), "theta_of", None)
    if "theta" not in globals_ and callable(theta_of):  # theta as a pyro.param of the model
        with contextlib.suppress(KeyError):  # a global site missing from params
            globals_["theta"] = theta_of(params).detach()
    constant, constant_dims = _constant_data(xq, globals_, D)
    attrs: dict[str, Any] = {
        "approximation": name or type(posterior).__name__,
        "posterior_class": type(posterior).__name__,
        "parameter_naming": "module parameter name and row-major index, e.g. '0.weight[3,0]'",
        "query_points": "held out: they never entered the posterior",
    }
    seconds = wall_time if wall_time is not None else getattr(posterior, "wall_time", None)
    if seconds is not None and math.isfinite(float(seconds)):
        attrs["wall_time"] = float(seconds)
    if isinstance(posterior, SamplePosterior):
        attrs["engine"] = posterior.engine

    def dataset(
        data: Mapping[str, np.ndarray], dims: Mapping[str, list[str]], *, sampled: bool = True
    ) -> xr.Dataset:
        return az.dict_to_dataset(
            dict(data),
            attrs=attrs,
            coords=coords,
            dims=dict(dims),
            default_dims=None if sampled else [],
        )

    groups: dict[str, xr.Dataset] = {
        "posterior": dataset({"phi": as_numpy(draws)}, {"phi": ["task", "parameter"]}),
        "posterior_predictive": dataset({"y": as_numpy(pp)}, {"y": y_dims}),
        "log_likelihood": dataset({"y": as_numpy(ll)}, {"y": ["task", "point"]}),
        "observed_data": dataset({"y": as_numpy(observed)}, {"y": y_dims}, sampled=False),
        "constant_data": dataset(constant, constant_dims, sampled=False),
    }
    if isinstance(posterior, SamplePosterior) and "diverging" in posterior.sampler_stats:
        index = thinning_index(posterior.num_draws, num_draws)
        diverging = as_numpy(posterior.sampler_stats["diverging"][:, index])
        groups["sample_stats"] = dataset({"diverging": diverging}, {"diverging": ["task"]})
    return az.InferenceData(attrs=None, warn_on_custom_groups=False, **groups)


def _constant_data(
    xq: Tensor, params: Mapping[str, Tensor], num_params: int
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The query inputs and the global values, with their dims."""
    x = xq if xq.dim() == 2 else xq.reshape(*xq.shape[:2], -1)
    data: dict[str, np.ndarray] = {"x": as_numpy(x)}
    dims: dict[str, list[str]] = {"x": ["task", "point"] + (["input"] if x.dim() == 3 else [])}
    for key, value in params.items():
        if not isinstance(value, Tensor) or key in data:
            continue
        data[key] = as_numpy(value)
        if value.shape == (num_params,):
            dims[key] = ["parameter"]
        else:
            dims[key] = [f"{key}_dim_{i}" for i in range(value.dim())]
    return data, dims


def convergence_diagnostics(draws: np.ndarray) -> dict[str, np.ndarray]:
    r"""Rank-normalised split :math:`\hat R`, bulk and tail ESS of ``draws`` ``(C, S, T, D)``.

    Returns ``{"rhat", "ess_bulk", "ess_tail"}``, each ``(T, D)`` (Vehtari et al. 2021). A
    parameter whose draws are constant gets :math:`\hat R` = NaN.
    """
    if draws.ndim != 4:
        raise ValueError(f"draws must be (chains, draws, tasks, parameters); got {draws.shape}")
    dataset = az.convert_to_dataset({"phi": draws}, dims={"phi": ["task", "parameter"]})
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # ArviZ warns on constant chains (a point mass); R-hat is then NaN, which we report.
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = az.rhat(dataset, method="rank")["phi"].values
        ess_bulk = az.ess(dataset, method="bulk")["phi"].values
        ess_tail = az.ess(dataset, method="tail")["phi"].values
    return {"rhat": rhat, "ess_bulk": ess_bulk, "ess_tail": ess_tail}


def heldout_pointwise(idata: az.InferenceData) -> np.ndarray:
    r"""Pointwise held-out log predictive densities, flattened over (task, point):

    .. math:: \log \frac{1}{CS} \sum_{c,s} p(y^q_{jm} \mid \phi^{(c,s)}_j).
    """
    ll = np.asarray(idata["log_likelihood"]["y"].values, dtype=np.float64)
    C, S = ll.shape[:2]
    flat = ll.reshape(C * S, -1)
    top = flat.max(axis=0)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    return finite_top + np.log(np.exp(flat - finite_top).mean(axis=0))


def _elpd_data(pointwise: np.ndarray, num_samples: int) -> ELPDData:
    """Precomputed held-out ELPD in ArviZ's container (its key is ``elpd_loo``; no PSIS)."""
    n = pointwise.size
    return ELPDData(
        data=[
            float(pointwise.sum()),
            float(math.sqrt(n * pointwise.var())),
            0.0,
            num_samples,
            n,
            False,
            xr.DataArray(pointwise, dims=["__obs__"]),
            "log",
        ],
        index=[
            "elpd_loo",
            "se",
            "p_loo",
            "n_samples",
            "n_data_points",
            "warning",
            "loo_i",
            "scale",
        ],
    )


def compare_elpd(
    pointwise: Mapping[str, np.ndarray],
    *,
    num_samples: Mapping[str, int] | None = None,
    method: Literal["stacking", "BB-pseudo-BMA", "pseudo-BMA"] = "stacking",
) -> dict[str, dict[str, float]]:
    r"""``az.compare`` of held-out pointwise log predictive densities.

    Parameters
    ----------
    pointwise:
        Per approximation, the ``n`` pointwise values of :func:`heldout_pointwise` (the same
        points, in the same order, for every approximation).
    num_samples:
        Draws behind each approximation's values (recorded only).
    method:
        ``az.compare``'s weighting: ``"stacking"`` (default), ``"BB-pseudo-BMA"`` or
        ``"pseudo-BMA"``.

    Returns
    -------
    Per approximation ``{"rank", "elpd", "se", "elpd_diff", "dse", "weight"}``: ELPD summed
    over the ``n`` points with its standard error :math:`\sqrt{n\,\mathrm{Var}_i[\mathrm{lpd}_i]}`,
    the difference to the best and its paired standard error, and the stacking weight.
    """
    names = list(pointwise)
    sizes = {np.asarray(v).size for v in pointwise.values()}
    if len(sizes) != 1:
        raise ValueError(f"every approximation needs the same points; got sizes {sorted(sizes)}")
    data = {
        name: _elpd_data(
            np.asarray(pointwise[name], dtype=np.float64).ravel(),
            int((num_samples or {}).get(name, 0)),
        )
        for name in names
    }
    if len(names) == 1:
        only = data[names[0]]
        return {
            names[0]: {
                "rank": 0,
                "elpd": float(only["elpd_loo"]),
                "se": float(only["se"]),
                "elpd_diff": 0.0,
                "dse": 0.0,
                "weight": 1.0,
            }
        }
    with warnings.catch_warnings():
        # ArviZ 0.x sorts with pandas' deprecated inplace=True (pandas >= 3.1); harmless.
        warnings.filterwarnings("ignore", message=".*inplace.*", category=DeprecationWarning)
        table = az.compare(data, method=method)
    return {
        name: {
            "rank": int(table.loc[name, "rank"]),
            "elpd": float(table.loc[name, "elpd_loo"]),
            "se": float(table.loc[name, "se"]),
            "elpd_diff": float(table.loc[name, "elpd_diff"]),
            "dse": float(table.loc[name, "dse"]),
            "weight": float(table.loc[name, "weight"]),
        }
        for name in names
    }


# -- figures -----------------------------------------------------------------------------------


def default_parameters(idata: az.InferenceData, max_parameters: int = 8) -> list[str]:
    """The last ``max_parameters`` parameter names: a network's output layer."""
    names = [str(v) for v in idata["posterior"]["parameter"].values]
    return names[-max_parameters:]


def _figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _quiet_arviz_plots() -> None:
    """Inside ``warnings.catch_warnings()``: silence what ArviZ 0.x's plots say that is not
    ours to act on (matplotlib >= 3.11 deprecations of ArviZ's own calls; KDE or interval
    notes on the zero-width draws of a point mass)."""
    from matplotlib import MatplotlibDeprecationWarning

    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.filterwarnings("ignore", message=".*single value.*", category=UserWarning)
    warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning)


def _plot_point_mass(axes: np.ndarray, phi: xr.DataArray, chosen: Sequence[str]) -> None:
    """A point mass has no density: a spike at its value in each panel."""
    for ax, name in zip(axes, chosen, strict=True):
        value = float(phi.sel(parameter=name).mean())
        ax.axvline(value, color="C0", lw=2)
        ax.set_xlim(value - 1.0, value + 1.0)
        ax.set_yticks([])
        ax.set_title(f"phi\n{name}", fontsize=8)
        ax.text(
            value,
            0.5,
            f" point mass\n {value:.3g}",
            fontsize=8,
            transform=ax.get_xaxis_transform(),
        )


def _selection(
    idata: az.InferenceData, task: int | None, parameters: Sequence[str] | None
) -> tuple[Any, list[str]]:
    task_id = idata["posterior"]["task"].values[0] if task is None else task
    chosen = list(parameters) if parameters is not None else default_parameters(idata)
    return task_id, chosen


def plot_forest(
    idatas: Mapping[str, az.InferenceData],
    path: str | Path,
    *,
    task: int | None = None,
    parameters: Sequence[str] | None = None,
    hdi_prob: float = 0.9,
    title: str | None = None,
) -> Path:
    """``az.plot_forest`` of several approximations of one task, saved as PNG.

    ``task`` is a task coordinate (default the first); ``parameters`` parameter names (default
    :func:`default_parameters`). Each approximation's draws give its ``hdi_prob`` interval.
    """
    names = list(idatas)
    first = idatas[names[0]]
    task_id, chosen = _selection(first, task, parameters)
    fig = _figure(8.5, 1.2 + 0.22 * len(chosen) * len(names))
    ax = fig.add_subplot(1, 1, 1)
    with warnings.catch_warnings():
        # A point mass has a zero-width interval; ArviZ says so, and we draw it as a dot.
        _quiet_arviz_plots()
        az.plot_forest(
            [idatas[n] for n in names],
            model_names=names,
            var_names=["phi"],
            coords={"task": [task_id], "parameter": chosen},
            combined=True,
            hdi_prob=hdi_prob,
            ax=ax,
        )
    ax.set_title(title or f"task {task_id}: {hdi_prob:.0%} intervals of phi")
    legend = ax.get_legend()
    if legend is not None:  # beside the axes, not over the intervals
        handles = list(legend.legend_handles)
        labels = [text.get_text() for text in legend.get_texts()]
        legend.remove()
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_posterior(
    idata: az.InferenceData,
    path: str | Path,
    *,
    task: int | None = None,
    parameters: Sequence[str] | None = None,
    reference: az.InferenceData | None = None,
    reference_name: str = "reference",
    hdi_prob: float = 0.9,
    title: str | None = None,
) -> Path:
    """``az.plot_posterior`` of one task's parameters, saved as PNG.

    With ``reference`` (e.g. NUTS) each panel marks the reference posterior mean as
    ``ref_val``. A point mass (MAML) has no density to draw: with a reference, the panels show
    the *reference* posterior with the point mass's value as ``ref_val`` (so the percentages
    say where it falls in the reference); without one, a histogram of the single value.
    """
    task_id, chosen = _selection(idata, task, parameters)
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = _figure(3.3 * cols, 0.6 + 2.6 * rows)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    phi = idata["posterior"]["phi"].sel(task=task_id, parameter=chosen)
    spread = phi.std(dim=("chain", "draw"))
    degenerate = bool((spread <= 1e-12 * (1 + abs(phi.mean(dim=("chain", "draw"))))).any())
    shown: az.InferenceData | None = idata
    marked: az.InferenceData | None = reference
    if degenerate and reference is None:
        _plot_point_mass(axes.ravel()[: len(chosen)], phi, chosen)
        shown = None
    elif degenerate:
        shown, marked = reference, idata
    ref_val: Any = None
    if marked is not None:
        mark = marked["posterior"]["phi"].sel(task=task_id, parameter=chosen)
        mark = mark.mean(dim=("chain", "draw"))
        ref_val = {
            "phi": [
                {"task": task_id, "parameter": p, "ref_val": float(mark.sel(parameter=p))}
                for p in chosen
            ]
        }
    if shown is not None:
        # ArviZ asks for a "semibold" font that DejaVu Sans lacks; matplotlib logs each fallback.
        font_log = logging.getLogger("matplotlib.font_manager")
        level = font_log.level
        font_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                _quiet_arviz_plots()
                az.plot_posterior(
                    shown,
                    var_names=["phi"],
                    coords={"task": [task_id], "parameter": chosen},
                    hdi_prob=hdi_prob,
                    ref_val=ref_val,
                    ax=axes.ravel()[: len(chosen)],
                    textsize=8,
                )
                fig.canvas.draw()  # resolve fonts while the logger is quiet
        finally:
            font_log.setLevel(level)
    for extra in axes.ravel()[len(chosen) :]:
        extra.set_axis_off()
    name = idata["posterior"].attrs.get("approximation", "")
    if title is None:
        if degenerate and reference is not None:
            title = f"{name} point mass (ref_val) on the {reference_name} posterior: task {task_id}"
        elif reference is not None:
            title = f"{name} (ref_val: {reference_name} mean): task {task_id}"
        else:
            title = f"{name}: task {task_id}"
    fig.suptitle(title, fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
