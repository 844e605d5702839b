r"""Reference task posteriors by NumPyro's No-U-Turn sampler, for built-in task models.

NumPyro's NUTS kernel (``numpyro.infer.hmc.hmc``) on the JAX log density of a
:class:`~hierbayes.models.TaskModel` (:func:`~hierbayes.inference.references.jax_density.jax_log_density`),
compiled once with ``jax.jit`` and vectorised over chains with ``jax.vmap`` (and over tasks
with ``vectorize_tasks``). JAX and NumPyro are imported when it runs, not before. See
:mod:`hierbayes.inference.references.nuts`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.references.chains import check_counts, initial_points, sample_posterior
from hierbayes.inference.references.jax_density import jax_log_density, jax_params, to_numpy
from hierbayes.inference.references.jax_network import JAX_INSTALL_HINT, require_jax
from hierbayes.inference.references.target import resolve_density
from hierbayes.models.task_model import TaskModel, TaskModelDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = ["nuts_numpyro"]


def _task_model(model_or_density: object) -> TaskModel:
    if isinstance(model_or_density, TaskModelDensity):
        return model_or_density.model
    if isinstance(model_or_density, TaskModel):
        return model_or_density
    raise TypeError(
        "nuts_numpyro needs a built-in hierbayes.models.TaskModel (or its TaskModelDensity), "
        f"whose log density has a JAX translation; got {type(model_or_density).__name__}. "
        "Use nuts_pyro, which runs any hierbayes model."
    )


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
        translation (:func:`~hierbayes.inference.references.jax_density.jax_log_density`), or its
        :class:`~hierbayes.models.TaskModelDensity`.
    params, tasks, num_warmup, num_samples, num_chains, target_accept_prob, max_tree_depth,
    init, init_radius:
        As in :func:`~hierbayes.inference.references.nuts_pyro.nuts_pyro` (the same ``seed``
        gives the same starting points).
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
    :class:`~hierbayes.inference.posteriors.samples.SamplePosterior` with draws
    ``(C, S, T, D)`` as torch tensors of the support data's dtype and the chains' convergence
    diagnostics; ``sampler_stats`` holds ``diverging`` and ``num_steps`` (leapfrog steps per
    draw); ``settings["compile_seconds"]`` the time spent compiling (included in
    ``wall_time``) and ``settings["leapfrog_steps"]`` the gradient evaluations of warm-up and
    sampling, all chains and tasks together.

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

    check_counts(num_warmup, num_samples, num_chains)
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
    return sample_posterior(
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
