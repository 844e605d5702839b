r"""Scales at their boundary: a full-batch fit whose objective still falls as a positive
scalar global (a group scale :math:`\tau`) goes to 0 is reported, with the cause and the fixes.

The marginal likelihood of a group scale peaks at 0 when the groups vary no more than their
noise explains (eight schools); the point estimate then means "no detectable variation".
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hierbayes.inference.training.empirical_bayes import all_tasks, positive_scalar_sites
from hierbayes.models.task_model import TaskModel
from hierbayes.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from hierbayes.inference.training.result import FitResult

__all__ = ["boundary_sites", "warn_at_boundary", "warn_if_prior_collapsed"]


def boundary_sites(
    result: FitResult, source: Any, *, dtype: torch.dtype | None, device: torch.device
) -> dict[str, float]:
    r"""The positive scalar globals at which the (deterministic) objective still falls towards
    0: ``{site: value}`` for each whose loss at :math:`\hat v/10` is no higher than at
    :math:`\hat v` (within a relative :math:`10^{-12}`), other values held fixed."""
    names = positive_scalar_sites(result)
    if not names:
        return {}
    batch = all_tasks(source, dtype, device)
    guide = result.guide
    found: dict[str, float] = {}
    base = _loss_at(result, batch, {})
    for name in names:
        value = guide.global_values()[name].detach()
        lower = _loss_at(result, batch, {name: value / 10})
        if lower <= base + 1e-12 * max(abs(base), 1.0):
            found[name] = float(value.reshape(()))
    return found


def _loss_at(result: FitResult, batch: TaskBatch, changes: Mapping[str, Tensor]) -> float:
    """The objective with the globals in ``changes`` set to new values (restored after)."""
    guide = result.guide
    saved = {key: value.detach().clone() for key, value in guide.state_dict().items()}
    guide.set_global_values(changes)
    try:
        return float(result.objective.meta_loss(guide, batch).detach())
    finally:
        guide.load_state_dict(saved)  # exactly as it was


def warn_at_boundary(found: Mapping[str, float], result: FitResult) -> None:
    """Warn that the objective peaks at a scale's boundary, with the cause and the fixes."""
    if not found:
        return
    listed = ", ".join(f"{name} = {value:.3g}" for name, value in found.items())
    space = result.objective.hyperprior_space
    fixes = (
        "score the hyperprior in the unconstrained space with its log-Jacobian "
        "(hyperprior_space='unconstrained', whose density of log tau vanishes at tau = 0), "
        if space == "constrained"
        else ""
    )
    warnings.warn(
        f"the {result.method} objective peaks at the boundary: {listed} fell towards 0 and the "
        "objective is still lower closer to 0. The marginal likelihood of a group scale is "
        "maximised at 0 when the groups vary no more than their noise explains (eight schools "
        "is the classic case), so this point estimate means 'no detectable variation', not a "
        f"fitted scale, and the group posteriors collapse onto the common mean. To fix it, "
        f"{fixes}give the scale a hyperprior that vanishes at 0 (e.g. a Gamma(2, ...) or "
        "log-normal prior), or integrate it out: full Bayes by NUTS over all latents",
        UserWarning,
        stacklevel=4,
    )


def warn_if_prior_collapsed(model: Any, result: FitResult) -> None:
    """Warn when a learned prior scale ended far below where it started: the Laplace posterior
    N(phi_hat, H^-1) is then close to a point mass."""
    if not isinstance(model, TaskModel) or not model.learn_prior_scale:
        return
    start = model.prior_scale_init
    with torch.no_grad():
        learned = model.prior_scale_of(result.guide.global_values())
    scale = learned.reshape(-1)[0] if isinstance(learned, Tensor) else torch.tensor(learned)
    if float(scale) < 0.01 * float(start):
        warnings.warn(
            f"the learned prior scale fell from {start:g} to {float(scale):.3g}: the {result.method} "
            "objective found no use for weight uncertainty, so the task posteriors are close to "
            "point masses and predictive intervals come from the noise scale alone. Fix the "
            "prior scale (learn_prior_scale=False) to keep a Laplace posterior with real width.",
            UserWarning,
            stacklevel=3,
        )
