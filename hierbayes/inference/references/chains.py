r"""What both NUTS engines share: counts checked, dispersed starting points, the result.

Chains start at :math:`\phi^{(0)} = c + u`, :math:`u \sim U[-r, r]^D`, with :math:`c` the prior
mean :math:`\mathbb E[\phi\mid\hat\theta]` (or ``init``) and ``r`` the ``init_radius``: the same
starts for both engines for a given ``seed``, drawn on the CPU so they do not depend on the
device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.models.density import TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = ["check_counts", "initial_points", "run_pyro_chain", "sample_posterior"]


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
    from hierbayes.inference.diagnostics.arviz_bridge import convergence_diagnostics

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


def run_pyro_chain(
    potential: Callable[[dict[str, Tensor]], Tensor],
    initial_params: dict[str, Tensor],
    *,
    num_samples: int,
    num_warmup: int,
    target_accept_prob: float,
    max_tree_depth: int,
    jit_compile: bool,
) -> tuple[dict[str, Tensor], list[int]]:
    """One chain of Pyro's NUTS on ``potential`` (diagonal mass matrix, step size and mass
    adapted in warm-up): its draws (detached) and the indices of its divergent transitions."""
    from pyro.infer import MCMC, NUTS

    kernel = NUTS(
        potential_fn=potential,
        target_accept_prob=target_accept_prob,
        max_tree_depth=max_tree_depth,
        adapt_step_size=True,
        adapt_mass_matrix=True,
        full_mass=False,
        jit_compile=jit_compile,
        ignore_jit_warnings=True,
    )
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=num_warmup,
        initial_params=initial_params,
        num_chains=1,
        disable_progbar=True,
    )
    mcmc.run()
    samples = {name: value.detach() for name, value in mcmc.get_samples().items()}
    found = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
    return samples, [int(i) for i in found if 0 <= int(i) < num_samples]
