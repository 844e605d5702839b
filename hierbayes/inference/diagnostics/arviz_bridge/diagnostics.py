r"""Convergence diagnostics of Markov chains by ArviZ: rank-normalised split :math:`\hat R`, bulk
and tail effective sample sizes (Vehtari et al. 2021), per task and parameter.

References
----------
1. Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021). Rank-normalization, folding, and
   localization: an improved R-hat for assessing convergence of MCMC. Bayesian Analysis.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import torch
from torch import Tensor

__all__ = ["convergence_diagnostics"]


def convergence_diagnostics(draws: Tensor | np.ndarray) -> dict[str, Tensor]:
    r"""Rank-normalised split :math:`\hat R`, bulk and tail ESS of ``draws`` ``(C, S, T, D)``.

    Returns ``{"rhat", "ess_bulk", "ess_tail"}``, each a float64 CPU tensor ``(T, D)``, as
    :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` takes them. A parameter
    whose draws are constant gets :math:`\hat R` = NaN.
    """
    values = draws.detach().cpu().numpy() if isinstance(draws, Tensor) else np.asarray(draws)
    if values.ndim != 4:
        raise ValueError(
            f"draws must be (chains, draws, tasks, parameters); got shape {values.shape}"
        )
    dataset = az.convert_to_dataset({"phi": values}, dims={"phi": ["task", "parameter"]})
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # ArviZ warns on constant chains (a point mass); R-hat is then NaN, which we report.
        warnings.simplefilter("ignore", RuntimeWarning)
        found = {
            "rhat": az.rhat(dataset, method="rank"),
            "ess_bulk": az.ess(dataset, method="bulk"),
            "ess_tail": az.ess(dataset, method="tail"),
        }
    return {
        key: torch.as_tensor(np.asarray(value["phi"].values, dtype=np.float64))
        for key, value in found.items()
    }
