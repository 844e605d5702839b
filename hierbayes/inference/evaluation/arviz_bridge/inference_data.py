r"""Task posteriors as ``arviz.InferenceData`` on held-out query sets.

:func:`to_inference_data` turns any :class:`~hierbayes.inference.TaskPosterior` and a batch of
held-out tasks into the groups, dimensions and coordinates described in
:mod:`hierbayes.inference.evaluation.arviz_bridge`. The draws of :math:`\phi` come from
:func:`~hierbayes.inference.evaluation.readout.posterior_draws`.
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

from hierbayes.inference.evaluation.readout import posterior_draws, wall_time_of
from hierbayes.inference.posteriors.base import TaskPosterior
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
    posterior: TaskPosterior, draws: Tensor, xq: Tensor, yq: Tensor, seed: int
) -> tuple[Tensor, Tensor]:
    r""":math:`\log p(y^q_{jm}\mid\phi)` ``(C, S, T, M)`` and draws of :math:`y` from
    :math:`p(y\mid\phi, x^q)` ``(C, S, T, M, ...)``, ``_CHUNK`` draws of :math:`\phi` at a time."""
    density, params = posterior.density, posterior.params
    C, S, T, D = draws.shape
    flat = draws.reshape(C * S, T, D)
    log_lik: list[Tensor] = []
    predictive: list[Tensor] = []
    # the observation distributions draw from the global generators: seed them, then restore
    devices = [draws.device] if draws.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, C * S, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            n = chunk.shape[0]
            xs = xq.unsqueeze(0).expand(n, *xq.shape).reshape(n * T, *xq.shape[1:])
            ys = yq.unsqueeze(0).expand(n, *yq.shape).reshape(n * T, *yq.shape[1:])
            fn = density.predictive(params, chunk.reshape(n * T, D), xs)
            site_shape = torch.Size(cast(Any, fn).shape())  # batch_shape + event_shape
            if ys.shape != site_shape and ys.numel() == site_shape.numel():
                # the model observes y in its own layout (e.g. y[..., 0], no trailing dim)
                ys = ys.reshape(site_shape)
            log_lik.append(fn.log_prob(ys).reshape(n, T, -1))
            predictive.append(fn.sample().reshape(n, T, *yq.shape[1:]))
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
    r"""An ``arviz.InferenceData`` of ``posterior`` on ``tasks``' query sets.

    Parameters
    ----------
    posterior:
        Any :class:`~hierbayes.inference.TaskPosterior` of the ``T`` tasks of ``tasks``
        (adapted to their support sets).
    tasks:
        The held-out tasks, with query sets ``(T, M, ...)`` of equal size (no query mask).
    num_draws, num_chains:
        Draws per chain and chains. MCMC posteriors keep their own chains, thinned to
        ``num_draws`` evenly spaced draws; other posteriors get ``num_chains`` chains of
        independent draws (see :func:`~hierbayes.inference.evaluation.readout.posterior_draws`).
    seed:
        Seeds the draws of :math:`\phi` and of the posterior predictive. Gaussian posteriors
        share their standard-normal draws for a given seed (common random numbers).
    name, wall_time:
        Recorded in the attributes (``approximation``, ``wall_time``; by default the
        posterior's recorded wall time).

    Returns
    -------
    ``InferenceData`` with the groups and coordinates of
    :mod:`hierbayes.inference.evaluation.arviz_bridge`.
    """
    xq, yq, mask = tasks.require_query("to_inference_data")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "to_inference_data needs query sets of equal size: ArviZ's pointwise log "
            "likelihood has no masked points. Pass tasks without a query mask (or with one "
            "that is all True)."
        )
    if posterior.num_tasks != tasks.num_tasks:
        raise ValueError(
            f"the posterior covers {posterior.num_tasks} tasks but the batch has "
            f"{tasks.num_tasks}; adapt the posterior to these tasks' support sets first"
        )
    draws = posterior_draws(posterior, num_chains, num_draws, seed=seed)
    C, S, _, D = draws.shape
    xq = xq.to(draws.device)
    yq = yq.to(draws.device)
    ll, predictive = _pointwise(posterior, draws, xq, yq, seed)
    observed, y_dims = _target_layout(yq)
    pp = predictive.reshape(C, S, *observed.shape)
    structure = posterior.density.structure
    site = structure.task_site  # variables are named after the model's own sites
    obs = structure.observed_sites[0] if len(structure.observed_sites) == 1 else "y"
    coords: dict[str, Any] = {
        "task": _task_coords(tasks),
        "parameter": parameter_coords(posterior.density, D),
        "point": list(range(observed.shape[1])),
    }
    if len(y_dims) == 3:
        coords["output"] = list(range(observed.shape[2]))
    constant, constant_dims = _constant_data(
        xq, _recorded_globals(posterior.density, posterior.params), D
    )
    attrs: dict[str, Any] = {
        "approximation": name or type(posterior).__name__,
        "posterior_class": type(posterior).__name__,
        "parameter_naming": "module parameter name and row-major index, e.g. '0.weight[3,0]', "
        "for a network model; the flat index of the per-task site otherwise",
        "task_site": site,
        "observed_site": obs,
        "query_points": "held out: they never entered the posterior, so their pointwise log "
        "likelihood is in the group 'heldout_log_likelihood', where az.loo and az.waic (which "
        "assume in-sample points) do not look; hierbayes' compare_elpd scores it directly",
    }
    seconds = wall_time if wall_time is not None else wall_time_of(posterior)
    if math.isfinite(float(seconds)):
        attrs["wall_time"] = float(seconds)
    if isinstance(posterior, SamplePosterior):
        attrs["engine"] = posterior.engine

    def dataset(
        data: Mapping[str, np.ndarray], dims: Mapping[str, list[str]], *, sampled: bool = True
    ) -> xr.Dataset:
        return az.dict_to_dataset(
            dict(data),
            attrs=attrs,
            coords=coords,
            dims=dict(dims),
            default_dims=None if sampled else [],
        )

    groups: dict[str, xr.Dataset] = {
        "posterior": dataset({site: _as_numpy(draws)}, {site: ["task", "parameter"]}),
        "posterior_predictive": dataset({obs: _as_numpy(pp)}, {obs: y_dims}),
        "heldout_log_likelihood": dataset({obs: _as_numpy(ll)}, {obs: ["task", "point"]}),
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
    xq: Tensor, params: Mapping[str, Tensor], num_params: int
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The query inputs and the global values, with their dims."""
    x = xq if xq.dim() == 2 else xq.reshape(*xq.shape[:2], -1)
    data: dict[str, np.ndarray] = {"x": _as_numpy(x)}
    dims: dict[str, list[str]] = {"x": ["task", "point"] + (["input"] if x.dim() == 3 else [])}
    for key, value in params.items():
        if not isinstance(value, Tensor) or key in data:
            continue
        data[key] = _as_numpy(value)
        if value.shape == (num_params,):
            dims[key] = ["parameter"]
        else:
            dims[key] = [f"{key}_dim_{i}" for i in range(value.dim())]
    return data, dims
