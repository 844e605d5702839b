r"""Reference task posteriors by the No-U-Turn sampler, through Pyro and through NumPyro.

Both functions sample, for each held-out task :math:`j` separately, the posterior of its
parameters given its support set and the meta-learned globals :math:`\hat\theta` (and noise
scale, prior scale, ...):

.. math::

    p(\phi_j \mid x^s_j, y^s_j, \hat\theta) \;\propto\;
        p(y^s_j \mid \phi_j, x^s_j)\; p(\phi_j \mid \hat\theta),

the exact posterior that MAML's point mass, the Laplace Gaussians and mean-field VI
approximate (Grant et al. 2018, §3). The potential energy is
:math:`U(\phi) = -\log p(y^s_j\mid\phi, x^s_j) - \log p(\phi\mid\hat\theta)`, read from the
model's :class:`~hierbayes.models.contract.TaskDensity` (Pyro) or from its JAX translation
(:func:`~hierbayes.models.jax_density.jax_log_density`, NumPyro).

* :func:`nuts_pyro` runs ``pyro.infer.MCMC(NUTS(potential_fn=U))`` for **any** hierbayes model,
  one chain after another (a task's chains are independent runs from dispersed starts).
* :func:`nuts_numpyro` runs NumPyro's NUTS kernel (``numpyro.infer.hmc.hmc``) on the JAX log
  density of a built-in :class:`~hierbayes.models.TaskModel`, compiled once with ``jax.jit``
  and vectorised over chains with ``jax.vmap`` (and over tasks with ``vectorize_tasks``).

Both use the same defaults as the libraries' own NUTS: windowed adaptation of the step size
(dual averaging to ``target_accept_prob``) and of a diagonal mass matrix during
``num_warmup`` steps, trees of depth at most ``max_tree_depth``. Chains start at
:math:`\phi^{(0)} = \hat\theta + u`, :math:`u \sim U[-r, r]^D` (``init_radius`` :math:`r`), the
same starts for both engines for a given ``seed``. The result is a
:class:`~hierbayes.inference.posteriors.samples.SamplePosterior` whose rank-normalised :math:`\hat R`
flags tasks above 1.01 (never silently used as a reference: see
:func:`hierbayes.inference.evaluation.compare.compare_approximations`).

References
----------
1. Hoffman & Gelman (2014). The No-U-Turn sampler: adaptively setting path lengths in
   Hamiltonian Monte Carlo. JMLR 15.
2. Bingham et al. (2019). Pyro: deep universal probabilistic programming. JMLR 20.
3. Phan, Pradhan & Jankowiak (2019). Composable effects for flexible and accelerated
   probabilistic programming in NumPyro. arXiv:1912.11554.
4. Grant, Finn, Levine, Darrell & Griffiths (2018). Recasting gradient-based meta-learning as
   hierarchical Bayes. ICLR.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.inference.posteriors.samples import SamplePosterior, resolve_density
from hierbayes.models.contract import TaskDensity
from hierbayes.models.jax_density import (
    JAX_INSTALL_HINT,
    jax_log_density,
    jax_params,
    require_jax,
    to_numpy,
)
from hierbayes.models.task_model import TaskModel
from hierbayes.tasks.batch import TaskBatch

__all__ = ["initial_points", "nuts_numpyro", "nuts_pyro"]


def _check_counts(num_warmup: int, num_samples: int, num_chains: int) -> None:
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
    :math:`U[-r, r]` noise from a generator seeded with ``seed``."""
    with torch.no_grad():
        center = density.prior_mean(params, tasks.support_x) if init is None else init
        T = tasks.num_tasks
        center = center.detach().expand(T, center.shape[-1])
        generator = torch.Generator().manual_seed(seed)
        u = torch.rand((num_chains, *center.shape), generator=generator, dtype=center.dtype)
        return center + (2 * u.to(center.device) - 1) * init_radius


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
        Any hierbayes model (a Pyro program following :mod:`hierbayes.models.contract`) or its
        :class:`~hierbayes.models.contract.TaskDensity` (e.g. ``fit_result.guide.density``).
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
        Starting points, see :func:`initial_points`.
    jit_compile:
        Pyro's ``torch.jit`` tracing of the potential's gradient.

    Returns
    -------
    :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` with draws ``(C, S, T, D)``, the
    divergences in ``sampler_stats["diverging"]`` and the total wall time.
    """
    from pyro.infer import MCMC, NUTS

    _check_counts(num_warmup, num_samples, num_chains)
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
                log_joint = density.log_likelihood(params, phi, xt, yt, mt)
                log_joint = log_joint + density.log_prior(params, phi, xt)
                return -log_joint.sum()

            for c in range(C):
                torch.manual_seed(int(seeds[t, c]))
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
                    num_samples=S,
                    warmup_steps=num_warmup,
                    initial_params={"phi": starts[c, t].clone()},
                    num_chains=1,
                    disable_progbar=True,
                )
                mcmc.run()
                draws[c, :, t] = mcmc.get_samples()["phi"].detach().reshape(S, D)
                found = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
                for i in found:
                    if 0 <= int(i) < S:
                        diverging[c, int(i), t] = True
    wall = time.perf_counter() - started
    return SamplePosterior(
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


def _task_model(model_or_density: Any) -> TaskModel:
    model = getattr(model_or_density, "model", model_or_density)
    if not isinstance(model, TaskModel):
        raise TypeError(
            "nuts_numpyro needs a built-in hierbayes.models.TaskModel (or its TaskModelDensity), "
            f"whose log density has a JAX translation; got {type(model_or_density).__name__}. "
            "Use nuts_pyro, which runs any hierbayes model."
        )
    return model


def nuts_numpyro(
    model: Any,
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
    vectorize_tasks: bool = False,
    x64: bool | None = None,
) -> SamplePosterior:
    r"""NUTS draws of :math:`p(\phi_j \mid x^s_j, y^s_j, \hat\theta)` for every task, by NumPyro.

    Parameters
    ----------
    model:
        A :class:`~hierbayes.models.TaskModel` whose network and likelihood have a JAX
        translation (:func:`~hierbayes.models.jax_density.jax_log_density`), or its
        :class:`~hierbayes.models.TaskModelDensity`.
    params, tasks, num_warmup, num_samples, num_chains, target_accept_prob, max_tree_depth,
    init, init_radius:
        As in :func:`nuts_pyro` (the same ``seed`` gives the same starting points).
    seed:
        Seeds the starting points and the JAX PRNG keys.
    vectorize_tasks:
        ``False`` (default): tasks one after another, each task's chains vectorised with
        ``jax.vmap`` (one compilation serves every task). ``True``: all ``T·C`` chains in one
        vectorised program; each NUTS iteration then costs the deepest tree among them.
    x64:
        Run in float64 (inside ``jax.enable_x64``). Default: when the support data is float64.

    Returns
    -------
    :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` with draws ``(C, S, T, D)`` as torch
    tensors of the support data's dtype; ``sampler_stats`` holds ``diverging`` and
    ``num_steps`` (leapfrog steps per draw); ``settings["compile_seconds"]`` the time spent
    compiling (included in ``wall_time``) and ``settings["leapfrog_steps"]`` the gradient
    evaluations of warm-up and sampling, all chains and tasks together.

    Raises
    ------
    ImportError
        Without JAX and NumPyro: ``pip install "hierbayes[jax]"``.
    """
    jax, _ = require_jax()
    try:
        from numpyro.infer.hmc import hmc
    except ImportError as err:  # pragma: no cover - exercised only without NumPyro
        raise ImportError(JAX_INSTALL_HINT) from err

    _check_counts(num_warmup, num_samples, num_chains)
    task_model = _task_model(model)
    density = resolve_density(model, tasks)
    params = {k: v.detach() for k, v in params.items()}
    T, C, S = tasks.num_tasks, num_chains, num_samples
    starts = initial_points(
        density, params, tasks, C, seed=seed, init=init, init_radius=init_radius
    )
    D = starts.shape[-1]
    x, y = tasks.support_x, tasks.support_y
    mask = tasks.support_mask
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    use_x64 = (x.dtype == torch.float64) if x64 is None else bool(x64)
    float_dtype = np.float64 if use_x64 else np.float32

    started = time.perf_counter()
    with jax.enable_x64(use_x64):
        log_density = jax_log_density(task_model)
        jparams = jax_params(task_model, params, dtype=float_dtype)

        def potential_gen(xx: Any, yy: Any, mm: Any) -> Any:
            return lambda phi: -log_density(phi, xx, yy, jparams, mm)

        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

        def run(keys: Any, z0: Any, xs: Any, ys: Any, ms: Any) -> Any:
            def init_one(key: Any, z: Any, xx: Any, yy: Any, mm: Any) -> Any:
                return init_kernel(
                    z,
                    num_warmup,
                    target_accept_prob=target_accept_prob,
                    max_tree_depth=max_tree_depth,
                    model_args=(xx, yy, mm),
                    rng_key=key,
                )

            state = jax.vmap(init_one)(keys, z0, xs, ys, ms)
            step = jax.vmap(lambda s, xx, yy, mm: sample_kernel(s, model_args=(xx, yy, mm)))

            def warm(s: Any, _: Any) -> Any:
                s = step(s, xs, ys, ms)
                return s, s.num_steps

            def keep(s: Any, _: Any) -> Any:
                s = step(s, xs, ys, ms)
                return s, (s.z, s.diverging, s.num_steps)

            state, warm_steps = jax.lax.scan(warm, state, None, length=num_warmup)
            _, (z, diverging, steps) = jax.lax.scan(keep, state, None, length=S)
            return z, diverging, steps, warm_steps.sum()

        keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), T * C)).reshape(T, C, -1)
        z0 = to_numpy(starts, float_dtype).transpose(1, 0, 2)  # (T, C, D)
        xs, ys, ms = to_numpy(x, float_dtype), to_numpy(y, float_dtype), to_numpy(mask)
        groups = [list(range(T))] if vectorize_tasks else [[t] for t in range(T)]

        def batch_of(index: list[int]) -> tuple[Any, ...]:
            def per_chain(a: np.ndarray) -> np.ndarray:
                return np.repeat(a[index], C, axis=0)

            return (
                keys[index].reshape(len(index) * C, -1),
                z0[index].reshape(len(index) * C, D),
                per_chain(xs),
                per_chain(ys),
                per_chain(ms),
            )

        compile_started = time.perf_counter()
        compiled = jax.jit(run).lower(*batch_of(groups[0])).compile()
        compile_seconds = time.perf_counter() - compile_started
        z_all = np.empty((C, S, T, D), dtype=float_dtype)
        div_all = np.zeros((C, S, T), dtype=bool)
        steps_all = np.zeros((C, S, T), dtype=np.int64)
        warmup_leapfrog_steps = 0
        for index in groups:
            z, div, steps, warm_steps = compiled(*batch_of(index))
            warmup_leapfrog_steps += int(warm_steps)
            n = len(index)
            z = np.asarray(z).reshape(S, n, C, D)
            z_all[:, :, index] = z.transpose(2, 0, 1, 3)
            div_all[:, :, index] = np.asarray(div).reshape(S, n, C).transpose(2, 0, 1)
            steps_all[:, :, index] = np.asarray(steps).reshape(S, n, C).transpose(2, 0, 1)
    wall = time.perf_counter() - started
    draws = torch.as_tensor(z_all).to(device=x.device, dtype=starts.dtype)
    return SamplePosterior(
        density,
        params,
        draws,
        wall_time=wall,
        engine="numpyro",
        sampler_stats={
            "diverging": torch.as_tensor(div_all),
            "num_steps": torch.as_tensor(steps_all),
        },
        settings=dict(
            num_warmup=num_warmup,
            num_samples=S,
            num_chains=C,
            seed=seed,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            init_radius=init_radius,
            vectorize_tasks=vectorize_tasks,
            x64=use_x64,
            compile_seconds=compile_seconds,
            leapfrog_steps=warmup_leapfrog_steps + int(steps_all.sum()),
            jax_backend=jax.default_backend(),
        ),
    )
