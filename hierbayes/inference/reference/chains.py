r"""What both NUTS engines share: counts checked, dispersed starting points, the result.

Chains start at :math:`\phi^{(0)} = c + u`, :math:`u \sim U[-r, r]^D`, with :math:`c` the prior
mean :math:`\mathbb E[\phi\mid\hat\theta]` (or ``init``) and ``r`` the ``init_radius``: the same
starts for both engines for a given ``seed``, drawn on the CPU so they do not depend on the
device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.models.density import TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = ["check_counts", "initial_points", "sample_posterior"]


def check_counts(num_warmup: int, num_samples: int, num_chains: int) -> None:
    """Raise ``ValueError`` unless ``num_warmup >= 0``, ``num_samples >= 1``, ``num_chains >= 1``."""
    if num_warmup < 0 or num_samples < 1 or num_chains < 1:
        raise ValueError(
            "need num_warmup >= 0, num_samples >= 1 and num_chains >= 1; got "
            f"{num_warmup}, {num_samples}, {num_chains}"
        )


def initial_points(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    tasks: TaskBatch,
    num_chains: int,
    *,
    seed: int = 0,
    init: Tensor | None = None,
    init_radius: float = 0.5,
) -> Tensor:
    r"""Dispersed starting points ``(C, T, D)``: ``init`` (default the prior mean
    :math:`\mathbb E[\phi\mid\hat\theta]`, ``(T, D)`` or ``(D,)``) plus
    :math:`U[-r, r]` noise from a CPU generator seeded with ``seed``."""
    with torch.no_grad():
        center = density.prior_mean(params, tasks.support_x) if init is None else init
        T = tasks.num_tasks
        center = center.detach().expand(T, center.shape[-1])
        generator = torch.Generator().manual_seed(seed)
        u = torch.rand((num_chains, *center.shape), generator=generator, dtype=center.dtype)
        return center + (2 * u.to(center.device) - 1) * init_radius


def sample_posterior(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    draws: Tensor,
    *,
    wall_time: float = math.nan,
    engine: str,
    sampler_stats: Mapping[str, Tensor],
    settings: Mapping[str, Any],
) -> SamplePosterior:
    r"""The :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` of a run, draws
    ``(C, S, T, D)``, with its convergence diagnostics computed by ArviZ (after the run, so
    they are not part of ``wall_time``)."""
    from hierbayes.inference.evaluation.arviz_bridge import convergence_diagnostics

    return SamplePosterior(
        density,
        params,
        draws,
        wall_time=wall_time,
        engine=engine,
        sampler_stats=sampler_stats,
        diagnostics=convergence_diagnostics(draws),
        settings=settings,
    )
