r"""What the Pyro road reads off a model's trace: per-task and per-point log densities of its
own sites, and the model traced again at other values of :math:`\phi`.

These read only the public content of a trace (each site's ``fn``, ``value``, ``scale``,
``mask`` and plates), so every handler a user wraps the model in applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.models.structure import ModelStructure, per_task_log_prob, trace_nodes

__all__ = [
    "pointwise_log_prob",
    "retrace",
    "task_site_log_prob",
    "traced_log_joint",
    "widened",
]

#: ``widen(fn) -> fn'``: the distribution a site's value is scored under instead of its own.
Widen = Callable[[dist.Distribution], dist.Distribution]


def retrace(
    model: Callable[..., Any],
    structure: ModelStructure,
    params: Mapping[str, Tensor],
    phi: Tensor,
    x: Tensor,
    y: Tensor,
) -> Trace:
    """``model`` traced on ``x``, ``y`` with its globals at ``params`` and its per-task latent
    at ``phi`` ``(T, D)`` (``poutine.condition``; the handlers around the call apply)."""
    data = dict(params)
    data[structure.task_site] = structure.to_site(phi)
    return poutine.trace(poutine.condition(model, data=data)).get_trace(x, y)


def task_site_log_prob(trace: Trace, structure: ModelStructure, num_tasks: int) -> Tensor:
    r""":math:`\log p(\phi_j\mid\theta)` of each task from ``trace``'s per-task site, with its
    scale and mask, ``(T,)``."""
    site = trace_nodes(trace)[structure.task_site]
    lp = site["fn"].log_prob(site["value"])
    mask = site["mask"]
    if isinstance(mask, bool):
        lp = lp if mask else torch.zeros_like(lp)
    elif mask is not None:
        lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    scale = site["scale"]
    if not (isinstance(scale, float) and scale == 1.0):
        lp = lp * scale
    return lp.expand(site["value"].shape[: structure.task_batch_ndim]).reshape(num_tasks)


def traced_log_joint(
    trace: Trace, structure: ModelStructure, num_tasks: int, mask: Tensor | None
) -> Tensor:
    r""":math:`\log p(y_j\mid\phi_j) + \log p(\phi_j\mid\theta)` per task from ``trace``'s own
    sites, each with its scale and mask (as Pyro's ``Trace_ELBO`` scores them), ``(T,)``."""
    return per_task_log_prob(trace, structure, num_tasks, mask) + task_site_log_prob(
        trace, structure, num_tasks
    )


def pointwise_log_prob(
    trace: Trace,
    structure: ModelStructure,
    num_tasks: int,
    mask: Tensor | None,
    widen: Widen | None = None,
) -> Tensor:
    r"""Each point's log density under ``trace``'s observed sites, ``(T, N)``: masked (the
    sites' own masks and ``mask`` ``(T, N)``), not scaled (a predictive's terms are
    log-mean-exps, which a scale does not pass through: the caller weights each task).

    ``widen`` replaces each site's distribution by another to score its value under (the
    Laplace predictive's wider Gaussian, or its probit-scaled logits)."""
    total: Tensor | None = None
    for name in structure.observed_sites:
        site = trace_nodes(trace)[name]
        data_dim = structure.data_dims.get(name)
        if data_dim is None:
            raise ModelContractError(
                f"observed site {name!r} is not in a data plate inside pyro.plate('tasks'), so "
                "it has no per-point predictive: put the observations in pyro.plate('data', N)"
            )
        fn = site["fn"] if widen is None else widen(site["fn"])
        lp = fn.log_prob(site["value"])
        site_mask = site["mask"]
        if isinstance(site_mask, bool):
            lp = lp if site_mask else torch.zeros_like(lp)
        elif site_mask is not None:
            lp = torch.where(site_mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        ndim = lp.dim()
        tasks_axis, data_axis = ndim + structure.tasks_dim, ndim + data_dim
        shape = list(lp.shape)
        shape[tasks_axis] = num_tasks
        lp = lp.expand(shape).movedim((tasks_axis, data_axis), (0, 1))
        lp = lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)
        total = lp if total is None else total + lp
    if total is None:
        raise ModelContractError("the model has no observed site to score")
    if mask is not None:
        total = torch.where(mask, total, torch.zeros((), dtype=total.dtype, device=total.device))
    return total


def widened(variance: Tensor, approximation: str, outputs: Tensor) -> Widen:
    r"""The Laplace predictive of a network's observation site: :math:`\mathcal N(f,
    \sigma^2 + v)` with the site's own mean and noise for a Gaussian site (``"linearized"``),
    :math:`\mathrm{Categorical}(f/\sqrt{1+\pi v/8})` for a categorical one (``"probit"``; a
    categorical site keeps only normalised logits, so the network's ``outputs`` :math:`f` at
    the same values give the unnormalised ones), with the epistemic variance ``variance``
    ``(T, M, C)`` of :math:`f`."""

    def widen(fn: dist.Distribution) -> dist.Distribution:
        reinterpreted = 0
        base: Any = fn
        while isinstance(base, dist.Independent):
            reinterpreted += base.reinterpreted_batch_ndims
            base = base.base_dist
        if approximation == "linearized" and isinstance(base, dist.Normal):
            scale = (base.scale.square() + variance.reshape(base.loc.shape)).sqrt()
            wide: Any = dist.Normal(base.loc, scale)
            return wide.to_event(reinterpreted) if reinterpreted else wide
        if approximation == "probit" and isinstance(base, dist.Categorical):
            logits = outputs / torch.sqrt(1.0 + torch.pi * variance / 8.0)
            return dist.Categorical(logits=logits)
        raise ModelContractError(
            f"the {approximation} predictive widens a Gaussian or categorical observation "
            f"site; the model's is {type(base).__name__}: use predictive='sampled'"
        )

    return widen
