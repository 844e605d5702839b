r"""Task posteriors as ``arviz.InferenceData`` on held-out query sets, or in sample.

:func:`to_inference_data` turns any :class:`~hierbayes.inference.posteriors.TaskPosterior` and a batch of
held-out tasks into the groups, dimensions and coordinates described in
:mod:`hierbayes.inference.diagnostics.arviz_bridge`. The draws of :math:`\phi` come from
:func:`~hierbayes.inference.diagnostics.readout.posterior_draws`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, cast

import arviz as az
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from hierbayes.inference.diagnostics.readout import posterior_draws, wall_time_of
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.joint import JointDrawsPosterior, params_at
from hierbayes.inference.posteriors.samples import SamplePosterior, thinning_index
from hierbayes.models.density import NetworkDensity
from hierbayes.models.likelihoods import GaussianLikelihood
from hierbayes.models.task_model import TaskModelDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "observed_variable",
    "parameter_coords",
    "parameter_names",
    "posterior_variable",
    "to_inference_data",
]

#: Draws of phi evaluated together when computing log likelihoods and predictive draws.
_CHUNK = 256


def _as_numpy(value: Tensor) -> np.ndarray:
    """A detached CPU NumPy copy."""
    return np.asarray(value.detach().cpu().numpy())


def parameter_names(density: object, num_params: int) -> list[str]:
    """Names of the ``D`` entries of :math:`\\phi`: for a
    :class:`~hierbayes.models.NetworkDensity`, ``"<module parameter>[i,j]"`` from the network's
    layout (row-major), then ``"log_noise_scale"`` for a per-task Gaussian noise scale (or
    ``"likelihood[i]"``); ``"phi[i]"`` for any other density."""
    if not isinstance(density, NetworkDensity):
        return [f"phi[{i}]" for i in range(num_params)]
    layout = density.network.layout
    if layout.num_params > num_params:
        return [f"phi[{i}]" for i in range(num_params)]
    names: list[str] = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        for index in np.ndindex(*tuple(shape)):
            names.append(f"{name}[{','.join(str(i) for i in index)}]")
    extra = num_params - len(names)  # the likelihood's per-task parameters follow the network's
    likelihood = density.likelihood
    if extra == 1 and isinstance(likelihood, GaussianLikelihood) and likelihood.per_task:
        names.append("log_noise_scale")
    else:
        names.extend(f"likelihood[{i}]" for i in range(extra))
    return names


def parameter_coords(density: object, num_params: int) -> list[Any]:
    """The ``parameter`` coordinate: a network's parameter names (:func:`parameter_names`), or
    the integers ``0..D-1`` for any other model (the variable already names the site)."""
    if isinstance(density, NetworkDensity):
        return list(parameter_names(density, num_params))
    return list(range(num_params))


def posterior_variable(idata: az.InferenceData) -> str:
    """The name of the per-task site's variable in ``idata``'s posterior group."""
    site = idata["posterior"].attrs.get("task_site")
    return str(site) if site else str(next(iter(idata["posterior"].data_vars)))


def observed_variable(idata: az.InferenceData) -> str:
    """The name of the observed site's variable in ``idata``."""
    site = idata["posterior"].attrs.get("observed_site")
    return str(site) if site else "y"


def _task_coords(tasks: TaskBatch) -> list[int]:
    if tasks.task_ids is not None:
        return [int(i) for i in tasks.task_ids]
    return list(range(tasks.num_tasks))


def _target_layout(y: Tensor) -> tuple[Tensor, list[str]]:
    """``(T, M, ...)`` targets to ``(T, M)`` or ``(T, M, O)``, with their dims."""
    if y.dim() == 2:
        return y, ["task", "point"]
    if y.dim() == 3 and y.shape[-1] == 1:
        return y[..., 0], ["task", "point"]
    return y.reshape(*y.shape[:2], -1), ["task", "point", "output"]


def _recorded_globals(density: object, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The global values, with :math:`\\theta` added where a ``TaskModel`` holds it as its own
    ``pyro.param`` rather than a global site."""
    found = dict(params)
    if "theta" not in found and isinstance(density, TaskModelDensity):
        with contextlib.suppress(KeyError):  # a global site missing from params
            found["theta"] = density.model.theta_of(params).detach()
    return found


def _pointwise(
    posterior: TaskPosterior,
    draws: Tensor,
    x: Tensor,
    y: Tensor,
    seed: int,
    global_draws: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r""":math:`\log p(y_{jm}\mid\phi)` ``(C, S, T, M)`` and draws of :math:`y` from
    :math:`p(y\mid\phi, x)` ``(C, S, T, M, ...)``: ``_CHUNK`` draws of :math:`\phi` at a time,
    or, with ``global_draws`` (each ``(C, S, ...)``), one joint draw :math:`(\theta, \phi)` at a
    time (the globals differ from draw to draw)."""
    density = posterior.density
    C, S, T, D = draws.shape
    flat = draws.reshape(C * S, T, D)
    if global_draws is None:
        starts = list(range(0, C * S, _CHUNK))
        size = _CHUNK
        fixed: Mapping[str, Tensor] = posterior.params
        flat_globals: dict[str, Tensor] = {}
    else:
        starts, size = list(range(C * S)), 1
        fixed = cast(JointDrawsPosterior, posterior).fixed
        flat_globals = {k: v.reshape(C * S, *v.shape[2:]) for k, v in global_draws.items()}
    log_lik: list[Tensor] = []
    predictive: list[Tensor] = []
    # the observation distributions draw from the global generators: seed them, then restore
    devices = [draws.device] if draws.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in starts:
            chunk = flat[start : start + size]
            n = chunk.shape[0]
            params = fixed if global_draws is None else params_at(fixed, flat_globals, start)
            xs = x.unsqueeze(0).expand(n, *x.shape).reshape(n * T, *x.shape[1:])
            ys = y.unsqueeze(0).expand(n, *y.shape).reshape(n * T, *y.shape[1:])
            fn = density.predictive(params, chunk.reshape(n * T, D), xs)
            site_shape = torch.Size(cast(Any, fn).shape())  # batch_shape + event_shape
            if ys.shape != site_shape and ys.numel() == site_shape.numel():
                # the model observes y in its own layout (e.g. y[..., 0], no trailing dim)
                ys = ys.reshape(site_shape)
            log_lik.append(fn.log_prob(ys).reshape(n, T, -1))
            predictive.append(fn.sample().reshape(n, T, *y.shape[1:]))
    return torch.cat(log_lik).reshape(C, S, T, -1), torch.cat(predictive)


def to_inference_data(
    posterior: TaskPosterior,
    tasks: TaskBatch,
    *,
    num_draws: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    name: str | None = None,
    wall_time: float | None = None,
) -> az.InferenceData:
    r"""An ``arviz.InferenceData`` of ``posterior`` on ``tasks``.

    Parameters
    ----------
    posterior:
        Any :class:`~hierbayes.inference.posteriors.TaskPosterior` of the ``T`` tasks of ``tasks``
        (adapted to their support sets). A posterior that integrates over the globals (a
        :class:`~hierbayes.inference.posteriors.joint.JointDrawsPosterior`: the full-Bayes
        reference, the hyper-Laplace mixture) puts its global draws in the posterior group
        under their site names and scores each draw of :math:`\phi` with its own globals.
    tasks:
        With query sets: the held-out tasks, scored on their query sets
        (``heldout_log_likelihood``). Without (``query_x`` is ``None``, e.g. groups as tasks
        with all their data in the support set): scored in sample on their support sets, in
        ArviZ's ``log_likelihood`` group, where ``az.loo`` and ``az.waic`` belong. Sets of
        unequal sizes (a mask with ``False`` entries) are laid out along one flattened
        ``observation`` dimension holding the real points only, with the coordinates
        ``observation_task`` and ``observation_point`` (each point's task and index); sets of
        equal size keep the ``(task, point)`` dimensions.
    num_draws, num_chains:
        Draws per chain and chains. MCMC posteriors keep their own chains, thinned to
        ``num_draws`` evenly spaced draws; other posteriors get ``num_chains`` chains of
        independent draws (see :func:`~hierbayes.inference.diagnostics.readout.posterior_draws`).
    seed:
        Seeds the draws of :math:`\phi` and of the posterior predictive. Gaussian posteriors
        share their standard-normal draws for a given seed (common random numbers).
    name, wall_time:
        Recorded in the attributes (``approximation``, ``wall_time``; by default the
        posterior's recorded wall time).

    Returns
    -------
    ``InferenceData`` with the groups and coordinates of
    :mod:`hierbayes.inference.diagnostics.arviz_bridge`.
    """
    in_sample = not tasks.has_query
    if in_sample:
        x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask
    else:
        x, y, mask = tasks.require_query("to_inference_data")
    if posterior.num_tasks != tasks.num_tasks:
        raise ValueError(
            f"the posterior covers {posterior.num_tasks} tasks but the batch has "
            f"{tasks.num_tasks}; adapt the posterior to these tasks' support sets first"
        )
    global_draws: dict[str, Tensor] | None = None
    if isinstance(posterior, JointDrawsPosterior):
        global_draws, draws = posterior.joint_draws(num_chains, num_draws, seed=seed)
    else:
        draws = posterior_draws(posterior, num_chains, num_draws, seed=seed)
    C, S, _, D = draws.shape
    x = x.to(draws.device)
    y = y.to(draws.device)
    ll, predictive = _pointwise(posterior, draws, x, y, seed, global_draws)
    observed, y_dims = _target_layout(y)
    pp = predictive.reshape(C, S, *observed.shape)
    ll_dims = ["task", "point"]
    flattened = mask is not None and not bool(mask.all())
    structure = posterior.density.structure
    site = structure.task_site  # variables are named after the model's own sites
    obs = structure.observed_sites[0] if len(structure.observed_sites) == 1 else "y"
    coords: dict[str, Any] = {
        "task": _task_coords(tasks),
        "parameter": parameter_coords(posterior.density, D),
    }
    extra_coords: dict[str, Any] = {}
    if flattened:
        assert mask is not None
        keep = mask.to(draws.device)
        where = keep.nonzero()
        observed = observed[keep]
        pp = pp[:, :, keep]
        ll = ll[:, :, keep]
        y_dims = ["observation", *y_dims[2:]]
        ll_dims = ["observation"]
        coords["observation"] = list(range(int(keep.sum())))
        task_ids = coords["task"]
        extra_coords = {
            "observation_task": ("observation", [task_ids[int(t)] for t in where[:, 0]]),
            "observation_point": ("observation", [int(p) for p in where[:, 1]]),
        }
    else:
        coords["point"] = list(range(observed.shape[1]))
    if "output" in y_dims:
        coords["output"] = list(range(observed.shape[-1]))
    fixed = (
        cast(JointDrawsPosterior, posterior).fixed
        if global_draws is not None
        else _recorded_globals(posterior.density, posterior.params)
    )
    constant, constant_dims = _constant_data(x, fixed, D, mask if flattened else None)
    if flattened:
        coords.pop("point", None)
    attrs: dict[str, Any] = {
        "approximation": name or type(posterior).__name__,
        "posterior_class": type(posterior).__name__,
        "parameter_naming": "module parameter name and row-major index, e.g. '0.weight[3,0]', "
        "for a network model; the flat index of the per-task site otherwise",
        "task_site": site,
        "observed_site": obs,
        "layout": "observation: the real points of tasks of unequal sizes, flattened (task by "
        "task), with observation_task and observation_point"
        if flattened
        else "(task, point)",
    }
    if in_sample:
        attrs["data"] = (
            "in sample: the tasks have no query set, so the posterior was conditioned on the "
            "points scored here; their pointwise log likelihood is ArviZ's 'log_likelihood' "
            "group, for az.loo and az.waic"
        )
    else:
        attrs["query_points"] = (
            "held out: they never entered the posterior, so their pointwise log likelihood is "
            "in the group 'heldout_log_likelihood', where az.loo and az.waic (which assume "
            "in-sample points) do not look; hierbayes' compare_elpd scores it directly"
        )
    if global_draws is not None:
        attrs["global_sites"] = list(global_draws)
    seconds = wall_time if wall_time is not None else wall_time_of(posterior)
    if math.isfinite(float(seconds)):
        attrs["wall_time"] = float(seconds)
    if isinstance(posterior, SamplePosterior):
        attrs["engine"] = posterior.engine

    def dataset(
        data: Mapping[str, np.ndarray], dims: Mapping[str, list[str]], *, sampled: bool = True
    ) -> xr.Dataset:
        found = az.dict_to_dataset(
            dict(data),
            attrs=attrs,
            coords=coords,
            dims=dict(dims),
            default_dims=None if sampled else [],
        )
        present = {k: v for k, v in extra_coords.items() if v[0] in found.dims}
        return found.assign_coords(present) if present else found

    posterior_data = {site: _as_numpy(draws)}
    posterior_dims: dict[str, list[str]] = {site: ["task", "parameter"]}
    for key, value in (global_draws or {}).items():
        posterior_data[key] = _as_numpy(value)
        posterior_dims[key] = [f"{key}_dim_{i}" for i in range(value.dim() - 2)]
    groups: dict[str, xr.Dataset] = {
        "posterior": dataset(posterior_data, posterior_dims),
        "posterior_predictive": dataset({obs: _as_numpy(pp)}, {obs: y_dims}),
        ("log_likelihood" if in_sample else "heldout_log_likelihood"): dataset(
            {obs: _as_numpy(ll)}, {obs: ll_dims}
        ),
        "observed_data": dataset({obs: _as_numpy(observed)}, {obs: y_dims}, sampled=False),
        "constant_data": dataset(constant, constant_dims, sampled=False),
    }
    if isinstance(posterior, SamplePosterior) and "diverging" in posterior.sampler_stats:
        diverging = posterior.sampler_stats["diverging"]
        index = thinning_index(posterior.num_draws, num_draws, diverging.device)
        groups["sample_stats"] = dataset(
            {"diverging": _as_numpy(diverging[:, index])}, {"diverging": ["task"]}
        )
    return az.InferenceData(attrs=None, warn_on_custom_groups=False, **groups)


def _constant_data(
    xq: Tensor, params: Mapping[str, Tensor], num_params: int, mask: Tensor | None = None
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The inputs (the real points only, flattened, where ``mask`` is given) and the global
    values, with their dims."""
    x = xq if xq.dim() == 2 else xq.reshape(*xq.shape[:2], -1)
    first = ["task", "point"]
    if mask is not None:
        x = x[mask.to(x.device)]
        first = ["observation"]
    data: dict[str, np.ndarray] = {"x": _as_numpy(x)}
    dims: dict[str, list[str]] = {"x": first + (["input"] if x.dim() == len(first) + 1 else [])}
    for key, value in params.items():
        if not isinstance(value, Tensor) or key in data:
            continue
        data[key] = _as_numpy(value)
        if value.shape == (num_params,):
            dims[key] = ["parameter"]
        else:
            dims[key] = [f"{key}_dim_{i}" for i in range(value.dim())]
    return data, dims
