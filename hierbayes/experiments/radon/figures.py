r"""The forest plot of the ``radon`` experiment: every county's intercept by three methods.

Drawn with matplotlib's object API on an Agg canvas (:func:`hierbayes.experiments.plots.agg_figure`):
no pyplot, so drawing never changes the user's matplotlib backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hierbayes.experiments.plots import agg_figure

__all__ = ["METHOD_STYLE", "plot_forest"]

#: Label and colour of each method, in the order they are drawn (top to bottom in a row).
METHOD_STYLE = {
    "empirical_bayes": ("empirical Bayes (Laplace at θ̂)", "tab:blue"),
    "hyper_laplace": ("hyper-Laplace (θ integrated)", "tab:orange"),
    "nuts": ("NUTS (full Bayes)", "black"),
}


def plot_forest(
    counties: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    county_effect_mean: float | None = None,
) -> Path:
    r"""One row per county, **sorted by the empirical-Bayes mean** (lowest at the bottom), with
    each method's mean and 90 % interval (``q05`` to ``q95``) side by side.

    Parameters
    ----------
    counties:
        The ``counties`` entries of ``metrics.json``: ``county`` (its index in the data file)
        and, per method of :data:`METHOD_STYLE`, ``{"mean", "sd", "q05", "q95"}``.
    path:
        Where the PNG goes.
    county_effect_mean:
        :math:`\hat\mu`, drawn as a dashed line when given.
    """
    order = sorted(range(len(counties)), key=lambda i: counties[i]["empirical_bayes"]["mean"])
    fig = agg_figure(7.5, 0.16 * len(counties) + 1.6)
    ax = fig.subplots()
    offsets = (0.25, 0.0, -0.25)
    for (method, (label, colour)), offset in zip(METHOD_STYLE.items(), offsets, strict=True):
        rows = [row + offset for row in range(len(order))]
        mean = [counties[i][method]["mean"] for i in order]
        low = [counties[i][method]["q05"] for i in order]
        high = [counties[i][method]["q95"] for i in order]
        ax.hlines(rows, low, high, color=colour, lw=1.0, label=f"{label}: 90 % interval")
        ax.plot(mean, rows, "o", color=colour, ms=2.2)
    if county_effect_mean is not None:
        ax.axvline(county_effect_mean, color="gray", ls="--", lw=0.8, label="μ̂ (empirical Bayes)")
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([str(counties[i]["county"]) for i in order], fontsize=5)
    ax.set_ylim(-1, len(order))
    ax.set_ylabel("county (index in the data file), sorted by the empirical-Bayes mean")
    ax.set_xlabel("county intercept α_j (log radon, before the county- and house-level terms)")
    ax.set_title("Minnesota radon: county intercepts by three methods", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out
