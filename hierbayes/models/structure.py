r"""The hierbayes model contract, read off a Pyro program's trace.

A hierbayes model is a plain Pyro program ``model(x, y=None)`` over a batch of ``T`` tasks
(Grant et al. 2018, eq. 2):

.. math::

    p(\theta, \phi_{1:T}, y_{1:T} \mid x_{1:T})
      = p(\theta) \prod_{j=1}^{T} p(\phi_j \mid \theta)\, p(y_j \mid \phi_j, x_j)

* **global latents** (:math:`\theta`, a noise scale, ...) are sample sites outside the tasks
  plate; the guide point-estimates them (type-II MAP). ``pyro.param`` sites are accepted too.
* **one per-task latent** :math:`\phi_j` is a sample site inside ``pyro.plate("tasks", T)``
  with a real-valued (unconstrained) support; any event shape, flattened to ``D`` numbers.
* **observations** are observed sites inside the tasks plate, usually in a nested data plate
  (needed for masks of tasks with unequal sizes).

:func:`model_structure` traces the program once and checks all of this, with errors that
explain the contract. The densities evaluated on that structure live in
:mod:`hierbayes.models.density`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroModule
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from hierbayes.errors import ModelContractError, TaskDataError
from hierbayes.models.diagnosis import (
    CONTRACT,
    TASKS_PLATE,
    explain_missing_tasks_plate,
    opened_plates,
    run_model,
)
from hierbayes.models.param_store import claim_param_store, own_param_sites

__all__ = [
    "TASKS_PLATE",
    "GlobalSite",
    "ModelStructure",
    "check_inputs",
    "model_structure",
    "per_task_log_prob",
    "trace_nodes",
]

_CONTRACT = CONTRACT


@dataclass(frozen=True)
class GlobalSite:
    """A latent sample site outside the tasks plate, point-estimated by the guide."""

    name: str
    shape: torch.Size
    event_dim: int
    support: constraints.Constraint
    prior_mean: Tensor


@dataclass(frozen=True)
class ModelStructure:
    r"""What :func:`model_structure` found in a model's trace.

    ``task_value_shape`` is the per-task site's value shape in the prototype trace, with
    ``num_tasks`` at batch dimension ``tasks_dim`` (negative, counted from the right of the
    batch shape); :meth:`to_site` and :meth:`from_site` convert between that shape and the flat
    ``(T, D)`` matrix the inner loop works with.
    """

    global_sites: tuple[GlobalSite, ...]
    param_sites: tuple[str, ...]
    task_site: str
    task_event_shape: torch.Size
    task_batch_ndim: int
    tasks_dim: int
    observed_sites: tuple[str, ...]
    data_dims: Mapping[str, int | None]
    #: The shape of one input point, ``x.shape[2:]`` of the batch the model was traced on.
    input_shape: tuple[int, ...] = ()
    #: The ``param_sites`` that are a ``PyroModule`` model's own parameters (saved and trained
    #: through the module, never through Pyro's store by name); the rest are a program's
    #: ``pyro.param`` statements.
    module_param_sites: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """:math:`D`, the number of per-task parameters."""
        return math.prod(self.task_event_shape)

    def to_site(self, phi: Tensor) -> Tensor:
        """``(T, D)`` to the per-task site's value shape (e.g. ``(T, 1, D)``)."""
        T = phi.shape[0]
        batch = [1] * self.task_batch_ndim
        batch[self.tasks_dim] = T
        return phi.reshape(*batch, *self.task_event_shape)

    def from_site(self, value: Tensor) -> Tensor:
        """The per-task site's value to ``(T, D)``."""
        event_ndim = len(self.task_event_shape)
        batch_shape = value.shape[: value.dim() - event_ndim]
        T = batch_shape[self.tasks_dim]
        return value.reshape(T, self.num_params)


def trace_nodes(trace: Trace) -> dict[str, Any]:
    """A trace's sites as plain dictionaries (Pyro types them as messages)."""
    nodes: dict[str, Any] = trace.nodes
    return nodes


def _plate_frame(site: Mapping[str, Any], name: str) -> Any:
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            return frame
    return None


def _prior_mean(site: Mapping[str, Any]) -> Tensor:
    """Where the guide starts a global site: its prior mean, or, where the mean is undefined or
    far out in a heavy tail (a LogNormal(0, 10) has mean e^50), the median of prior draws as
    Pyro's ``AutoDelta`` does (``init_to_median``)."""
    value: Tensor = site["value"].detach()
    try:
        mean = site["fn"].mean.detach().expand(value.shape)
        if bool(torch.isfinite(mean).all()) and (
            mean.numel() == 0 or float(mean.abs().max()) < 1e6
        ):
            return mean.clone()
    except (NotImplementedError, RuntimeError, ValueError):
        pass
    median: Tensor = init_to_median(dict(site)).detach()
    return median


def model_structure(model: Callable[..., Any], x: Tensor, y: Tensor | None) -> ModelStructure:
    """Trace ``model(x, y)`` once and check it against the hierbayes model contract.

    A ``PyroModule`` model first runs in an empty scope of Pyro's parameter store, which names
    its own parameters (:attr:`ModelStructure.module_param_sites`); the store's entries under
    those names are then pointed at the module's own tensors (:mod:`hierbayes.models.param_store`)
    before the traced run, so the trace never carries another model's values.
    """
    if not callable(model):
        raise ModelContractError(
            f"the model must be a Pyro program, a callable model(x, y=None); got "
            f"{type(model).__name__}. {_CONTRACT}"
        )
    trace, failure = run_model(model, x, y, own_scope=isinstance(model, PyroModule))
    if failure is not None or TASKS_PLATE not in opened_plates(trace):
        explain_missing_tasks_plate(model, x, y, trace, failure)
    if failure is not None:
        first_line = str(failure).splitlines()[0] if str(failure) else ""
        raise ModelContractError(
            f"running the model on a batch with x of shape {tuple(x.shape)} failed: "
            f"{type(failure).__name__}: {first_line} (the full error, with Pyro's table of the "
            f"sites' shapes where it gave one, is the cause above). {_CONTRACT}"
        ) from failure
    own = own_param_sites(model, trace)
    if isinstance(model, PyroModule):
        claim_param_store(model, own)
        trace, failure = run_model(model, x, y, own_scope=False)
        if failure is not None:
            raise ModelContractError(
                f"running the model on a batch with x of shape {tuple(x.shape)} failed with "
                f"the values in Pyro's parameter store: {type(failure).__name__}: {failure}"
            ) from failure
    T = x.shape[0]
    globals_: list[GlobalSite] = []
    params: list[str] = []
    task_sites: list[str] = []
    observed: list[str] = []
    for name, site in trace_nodes(trace).items():
        if site["type"] == "param":
            params.append(name)
            continue
        if (
            site["type"] != "sample"
            or site_is_subsample(site)
            or site["infer"].get("_deterministic")
        ):
            continue
        frame = _plate_frame(site, TASKS_PLATE)
        if site["is_observed"]:
            if frame is None:
                raise ModelContractError(
                    f"observed site {name!r} is outside pyro.plate('tasks'): every observation "
                    f"belongs to a task. {_CONTRACT}"
                )
            observed.append(name)
        elif frame is None:
            fn = site["fn"]
            globals_.append(
                GlobalSite(name, site["value"].shape, fn.event_dim, fn.support, _prior_mean(site))
            )
        else:
            task_sites.append(name)
    if not task_sites:
        raise ModelContractError(
            f"the model has no per-task latent: no unobserved sample site inside "
            f"pyro.plate('tasks'). {_CONTRACT}"
        )
    if len(task_sites) > 1:
        raise ModelContractError(
            f"the model has {len(task_sites)} per-task latents {task_sites}; hierbayes adapts "
            "exactly one. Concatenate them into one vector site (torch.cat of the pieces, "
            f"split again inside the model). {_CONTRACT}"
        )
    if not observed:
        raise ModelContractError(
            f"the model has no observed site inside pyro.plate('tasks') when given y: pass y "
            f"as obs= of the likelihood's sample site. {_CONTRACT}"
        )
    task_site = trace_nodes(trace)[task_sites[0]]
    fn = task_site["fn"]
    if (
        fn.support is not constraints.real
        and not (
            isinstance(fn.support, constraints.independent)
            and fn.support.base_constraint is constraints.real
        )
        and fn.support is not constraints.real_vector
    ):
        raise ModelContractError(
            f"the per-task latent {task_sites[0]!r} has support {fn.support}; gradient steps "
            "need a real-valued latent. Sample an unconstrained vector and transform it inside "
            "the model (e.g. exp of a log scale)."
        )
    frame = _plate_frame(task_site, TASKS_PLATE)
    event_shape = fn.event_shape
    batch_ndim = task_site["value"].dim() - len(event_shape)
    batch_shape = task_site["value"].shape[:batch_ndim]
    tasks_dim = frame.dim
    if -tasks_dim > batch_ndim or batch_shape[tasks_dim] != T or math.prod(batch_shape) != T:
        raise ModelContractError(
            f"the per-task latent {task_sites[0]!r} has value shape "
            f"{tuple(task_site['value'].shape)}; expected {T} tasks along the tasks plate's dim "
            f"{tasks_dim} and no other batch dimensions (event shape {tuple(event_shape)})."
        )
    if frame.size != T:
        raise ModelContractError(
            f"pyro.plate('tasks') has size {frame.size} but x has {T} tasks in its first dimension"
        )
    data_dims: dict[str, int | None] = {}
    for name in observed:
        site = trace_nodes(trace)[name]
        others = [f for f in site["cond_indep_stack"] if f.name != TASKS_PLATE and f.vectorized]
        data_dims[name] = others[0].dim if len(others) == 1 else None
        if data_dims[name] is not None and data_dims[name] <= tasks_dim:
            raise ModelContractError(
                f"observed site {name!r} has its data plate (dim={data_dims[name]}) left of the "
                f"tasks plate (dim={tasks_dim}), so its values are laid out (points, tasks): "
                "hierbayes reads observations as (tasks, points). Put pyro.plate('tasks', T, "
                "dim=-2) outside and pyro.plate('data', N, dim=-1) inside, so y[j, n] is point n "
                "of task j."
            )
    return ModelStructure(
        global_sites=tuple(globals_),
        param_sites=tuple(params),
        task_site=task_sites[0],
        task_event_shape=event_shape,
        task_batch_ndim=batch_ndim,
        tasks_dim=tasks_dim,
        observed_sites=tuple(observed),
        data_dims=data_dims,
        input_shape=tuple(x.shape[2:]),
        module_param_sites=own,
    )


def per_task_log_prob(
    trace: Trace, structure: ModelStructure, num_tasks: int, mask: Tensor | None
) -> Tensor:
    """Each task's summed log-probability of the observed sites in ``trace``, ``(T,)``.

    Every site's own ``scale`` and ``mask`` (set by ``poutine.scale``/``mask`` or a plate's
    subsampling) apply, as in Pyro's ELBOs; ``mask`` ``(T, N)`` additionally drops padded
    points along the site's data plate.
    """
    total: Tensor | None = None
    for name in structure.observed_sites:
        site = trace_nodes(trace)[name]
        fn = site["fn"]
        lp = fn.log_prob(site["value"])
        site_mask = site["mask"]
        if isinstance(site_mask, bool):
            if not site_mask:
                lp = torch.zeros_like(lp)
        elif site_mask is not None:
            lp = torch.where(site_mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        if site["scale"] is not None and not (
            isinstance(site["scale"], float) and site["scale"] == 1.0
        ):
            lp = lp * site["scale"]
        batch_ndim = lp.dim()
        tasks_axis = batch_ndim + structure.tasks_dim
        if mask is not None:
            data_dim = structure.data_dims.get(name)
            if data_dim is None:
                raise ModelContractError(
                    f"observed site {name!r} is not in a nested data plate, so tasks of unequal "
                    "sizes cannot be masked: put the observations in pyro.plate('data', N) "
                    "inside the tasks plate, or give every task the same number of points."
                )
            shape = [1] * batch_ndim
            shape[tasks_axis] = num_tasks
            shape[batch_ndim + data_dim] = mask.shape[1]
            m = mask if tasks_axis < batch_ndim + data_dim else mask.T
            lp = torch.where(
                m.reshape(shape), lp, torch.zeros((), dtype=lp.dtype, device=lp.device)
            )
        lp = lp.expand(*lp.shape[:tasks_axis], num_tasks, *lp.shape[tasks_axis + 1 :])
        per_task = lp.movedim(tasks_axis, 0).reshape(num_tasks, -1).sum(-1)
        total = per_task if total is None else total + per_task
    if total is None:
        raise ModelContractError("the model has no observed site to score")
    return total


def check_inputs(structure: ModelStructure, x: Tensor, field: str) -> None:
    """Raise :class:`~hierbayes.errors.TaskDataError` unless ``x`` is ``(tasks, points,
    *input_shape)`` with the input shape the model was built for."""
    if x.dim() < 2 or tuple(x.shape[2:]) != structure.input_shape:
        raise TaskDataError(
            f"{field} has shape {tuple(x.shape)}; the model was built for inputs of shape "
            f"(tasks, points, {', '.join(map(str, structure.input_shape)) or '...'}): each point "
            f"of shape {structure.input_shape}"
        )
