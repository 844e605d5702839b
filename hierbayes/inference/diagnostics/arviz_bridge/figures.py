r"""Figures of task posteriors by ArviZ: ``az.plot_forest`` of several approximations of one
task and ``az.plot_posterior`` of one approximation, each saved as PNG.

Figures are drawn on matplotlib's Agg canvas without pyplot's global state; parameters are
chosen by name (default :func:`default_parameters`, a network's output layer) and tasks by
their coordinate. A point mass (MAML) has no density to draw: it appears as a spike, or as the
``ref_val`` marked on a reference posterior.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import xarray as xr

from hierbayes.inference.diagnostics.arviz_bridge.inference_data import posterior_variable

__all__ = ["default_parameters", "plot_forest", "plot_posterior"]


def default_parameters(idata: az.InferenceData, max_parameters: int = 8) -> list[Any]:
    """The last ``max_parameters`` parameter coordinates: a network's output layer."""
    values = [v.item() if hasattr(v, "item") else v for v in idata["posterior"]["parameter"].values]
    return values[-max_parameters:]


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
    idata: az.InferenceData, task: int | None, parameters: Sequence[Any] | None
) -> tuple[Any, list[Any]]:
    task_id = idata["posterior"]["task"].values[0] if task is None else task
    chosen = list(parameters) if parameters is not None else default_parameters(idata)
    return task_id, chosen


def plot_forest(
    idatas: Mapping[str, az.InferenceData],
    path: str | Path,
    *,
    task: int | None = None,
    parameters: Sequence[Any] | None = None,
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
            var_names=[posterior_variable(first)],
            coords={"task": [task_id], "parameter": chosen},
            combined=True,
            hdi_prob=hdi_prob,
            ax=ax,
        )
    ax.set_title(
        title or f"task {task_id}: {hdi_prob:.0%} intervals of {posterior_variable(first)}"
    )
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
    parameters: Sequence[Any] | None = None,
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
    var = posterior_variable(idata)
    phi = idata["posterior"][var].sel(task=task_id, parameter=chosen)
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
        mark = marked["posterior"][posterior_variable(marked)].sel(task=task_id, parameter=chosen)
        mark = mark.mean(dim=("chain", "draw"))
        ref_val = {
            var: [
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
                    var_names=[posterior_variable(shown)],
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
