r"""Reference task posteriors by Pyro's No-U-Turn sampler, for any hierbayes model.

``pyro.infer.MCMC(NUTS(potential_fn=U))`` with
:math:`U(\phi) = -\log p(y^s_j\mid\phi, x^s_j) - \log p(\phi\mid\hat\theta)` read from the
model's :class:`~hierbayes.models.TaskDensity`, task after task and chain after chain (a
task's chains are independent runs from dispersed starts). See
:mod:`hierbayes.inference.references.nuts`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.core.joint import log_joint
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.references.chains import (
    check_counts,
    initial_points,
    run_pyro_chain,
    sample_posterior,
)
from hierbayes.inference.references.target import resolve_density
from hierbayes.tasks.batch import TaskBatch

__all__ = ["nuts_pyro"]


def nuts_pyro(
    model_or_density: Any,
    params: Mapping[str, Tensor],
    tasks: TaskBatch,
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    init: Tensor | None = None,
    init_radius: float = 0.5,
    jit_compile: bool = False,
) -> SamplePosterior:
    r"""NUTS draws of :math:`p(\phi_j \mid x^s_j, y^s_j, \hat\theta)` for every task, by Pyro.

    Parameters
    ----------
    model_or_density:
        Any hierbayes model (a Pyro program following :mod:`hierbayes.models.structure`) or its
        :class:`~hierbayes.models.TaskDensity` (e.g. ``fit_result.guide.density``).
    params:
        The global values :math:`\hat\theta`, ... (e.g. ``fit_result.params``), held fixed.
    tasks:
        The tasks; only their support sets ``(T, N, ...)`` (and support mask) are used.
    num_warmup, num_samples, num_chains:
        Per task: adaptation steps, kept draws per chain, and chains (>= 2 for a meaningful
        :math:`\hat R`).
    seed:
        Seeds the starting points and each chain (chain ``c`` of task ``j`` gets its own seed
        drawn from it); the global torch RNG is left as it was.
    target_accept_prob, max_tree_depth:
        NUTS' adaptation target and tree-depth limit (Pyro's defaults 0.8 and 10).
    init, init_radius:
        Starting points, see :func:`~hierbayes.inference.references.chains.initial_points`.
    jit_compile:
        Pyro's ``torch.jit`` tracing of the potential's gradient.

    Returns
    -------
    :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` with draws
    ``(C, S, T, D)``, the divergences in ``sampler_stats["diverging"]``, the total wall time
    and the chains' convergence diagnostics.
    """

    check_counts(num_warmup, num_samples, num_chains)
    density = resolve_density(model_or_density, tasks)
    params = {k: v.detach() for k, v in params.items()}
    x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask
    T, C, S = tasks.num_tasks, num_chains, num_samples
    starts = initial_points(
        density, params, tasks, C, seed=seed, init=init, init_radius=init_radius
    )
    D = starts.shape[-1]
    draws = starts.new_empty((C, S, T, D))
    diverging = torch.zeros((C, S, T), dtype=torch.bool)
    seeds = torch.randint(2**62, (T, C), generator=torch.Generator().manual_seed(seed + 1))
    evaluations = [0]
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        for t in range(T):
            xt, yt = x[t : t + 1], y[t : t + 1]
            mt = None if mask is None else mask[t : t + 1]

            def potential(
                values: Mapping[str, Tensor],
                xt: Tensor = xt,
                yt: Tensor = yt,
                mt: Tensor | None = mt,
            ) -> Tensor:
                evaluations[0] += 1
                phi = values["phi"].unsqueeze(0)
                return -log_joint(density, params, phi, xt, yt, mt).sum()

            for c in range(C):
                torch.manual_seed(int(seeds[t, c]))
                samples, divergent = run_pyro_chain(
                    potential,
                    {"phi": starts[c, t].clone()},
                    num_samples=S,
                    num_warmup=num_warmup,
                    target_accept_prob=target_accept_prob,
                    max_tree_depth=max_tree_depth,
                    jit_compile=jit_compile,
                )
                draws[c, :, t] = samples["phi"].reshape(S, D)
                diverging[c, divergent, t] = True
    wall = time.perf_counter() - started
    return sample_posterior(
        density,
        params,
        draws,
        wall_time=wall,
        engine="pyro",
        sampler_stats={"diverging": diverging},
        settings=dict(
            num_warmup=num_warmup,
            num_samples=S,
            num_chains=C,
            seed=seed,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            init_radius=init_radius,
            jit_compile=jit_compile,
            torch_threads=torch.get_num_threads(),
            potential_evaluations=evaluations[0],
        ),
    )
