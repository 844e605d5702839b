r"""Held-out expected log predictive density, ranked and weighed by ``az.compare``.

The query points never entered the posterior, so the held-out ELPD is the plain Monte-Carlo
log predictive density

.. math:: \widehat{\mathrm{elpd}} = \sum_{j,m}\log\frac1S\sum_s p(y^q_{jm}\mid\phi^{(s)}_j),

with no leave-one-out correction: :func:`compare_elpd` gives ``az.compare`` those pointwise
values (as precomputed ``az.ELPDData``), which ranks the approximations and computes paired
standard errors of their differences and stacking weights (Yao et al. 2018). PSIS-LOO on these
values would "remove" points that were never in the posterior.

References
----------
1. Vehtari, Gelman & Gabry (2017). Practical Bayesian model evaluation using leave-one-out
   cross-validation and WAIC. Statistics and Computing.
2. Yao, Vehtari, Simpson & Gelman (2018). Using stacking to average Bayesian predictive
   distributions. Bayesian Analysis.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal

import arviz as az
import numpy as np
import xarray as xr

from hierbayes.inference.diagnostics.arviz_bridge.inference_data import observed_variable

__all__ = ["compare_elpd", "compare_loo", "heldout_pointwise"]


def heldout_pointwise(idata: az.InferenceData) -> np.ndarray:
    r"""Pointwise held-out log predictive densities, flattened over (task, point):

    .. math:: \log \frac{1}{CS} \sum_{c,s} p(y^q_{jm} \mid \phi^{(c,s)}_j).
    """
    ll = np.asarray(
        idata["heldout_log_likelihood"][observed_variable(idata)].values, dtype=np.float64
    )
    C, S = ll.shape[:2]
    flat = ll.reshape(C * S, -1)
    top = flat.max(axis=0)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    return finite_top + np.log(np.exp(flat - finite_top).mean(axis=0))


def _elpd_data(pointwise: np.ndarray, num_samples: int) -> az.ELPDData:
    """Precomputed held-out ELPD in ArviZ's container (its key is ``elpd_loo``; no PSIS)."""
    n = pointwise.size
    return az.ELPDData(
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


def compare_loo(
    idatas: Mapping[str, az.InferenceData],
    *,
    method: Literal["stacking", "BB-pseudo-BMA", "pseudo-BMA"] = "stacking",
) -> dict[str, dict[str, float]]:
    r"""``az.compare`` by PSIS-LOO of in-sample pointwise log likelihoods (tasks without a
    query set: the posterior saw every scored point, so leave-one-out is the estimate of
    out-of-sample fit; Vehtari, Gelman & Gabry 2017).

    Returns per approximation ``{"rank", "elpd", "se", "elpd_diff", "dse", "weight", "p_loo",
    "pareto_k_max"}``. A point mass (constant draws) gives ``p_loo`` 0; Pareto :math:`\hat k`
    above 0.7 (``pareto_k_max``) marks an unreliable estimate, reported rather than warned.
    """
    names = list(idatas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", message=".*inplace.*", category=DeprecationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        loos = {name: az.loo(idatas[name], pointwise=True) for name in names}
        table = az.compare(loos, method=method) if len(names) > 1 else None
    out: dict[str, dict[str, float]] = {}
    for name in names:
        loo = loos[name]
        row = {
            "p_loo": float(loo["p_loo"]),
            "pareto_k_max": float(np.nanmax(np.asarray(loo["pareto_k"]))),
        }
        if table is None:
            row.update(
                rank=0,
                elpd=float(loo["elpd_loo"]),
                se=float(loo["se"]),
                elpd_diff=0.0,
                dse=0.0,
                weight=1.0,
            )
        else:
            row.update(
                rank=int(table.loc[name, "rank"]),
                elpd=float(table.loc[name, "elpd_loo"]),
                se=float(table.loc[name, "se"]),
                elpd_diff=float(table.loc[name, "elpd_diff"]),
                dse=float(table.loc[name, "dse"]),
                weight=float(table.loc[name, "weight"]),
            )
        out[name] = row
    return out
