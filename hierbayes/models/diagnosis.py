r"""Why a program breaks the model contract, or data its likelihood: told in their own terms.

:func:`~hierbayes.models.structure.model_structure` runs a program once with every error
caught (:func:`run_model`), so that what the program did before failing (the sites and
plates it reached) can be read. A program without ``pyro.plate("tasks")`` usually fails with
a shape error deep inside Pyro, whose message is a table of every site's shape: here it is
told which plates it opened, that hierbayes needs one named ``"tasks"`` around the per-task
latent, and how to write it, with Pyro's own error kept as the ``__cause__``.
:func:`support_violation` tells which observed value lies outside its site's support (a count
above a Binomial's ``total_count``, a label out of range) by field, task, point and value,
where torch would print the whole tensor.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Independent

from hierbayes.errors import ModelContractError


class ObservedLayout(Protocol):
    """Where a model's observed sites lay out tasks and points (a
    :class:`~hierbayes.models.structure.ModelStructure` is one)."""

    @property
    def observed_sites(self) -> tuple[str, ...]: ...

    @property
    def tasks_dim(self) -> int: ...

    @property
    def data_dims(self) -> Mapping[str, int | None]: ...


__all__ = [
    "CONTRACT",
    "TASKS_PLATE",
    "PlateInfo",
    "explain_missing_tasks_plate",
    "opened_plates",
    "run_model",
    "support_violation",
]

#: The name of the plate hierbayes reads the tasks from.
TASKS_PLATE = "tasks"

CONTRACT = (
    "A hierbayes model is a Pyro program model(x, y=None) over a batch of tasks (x: (tasks, "
    "points, ...)): global latents such as theta as sample sites outside every plate, exactly "
    "one per-task latent phi as a sample site inside pyro.plate('tasks', T), and the "
    "observations as observed sites inside that plate (in a nested data plate). See "
    "hierbayes.models.TaskModel for a worked example."
)

_EXAMPLE = (
    "    with pyro.plate('tasks', x.shape[0], dim=-2):\n"
    "        phi = pyro.sample('phi', dist.Normal(theta, 1.0).to_event(1))"
)

#: A plate the program opened: its size and, where a site inside it shows it, its dim.
PlateInfo = tuple[int, int | None]


def run_model(
    model: Callable[..., Any], x: Tensor, y: Tensor | None, *, own_scope: bool
) -> tuple[Trace, Exception | None]:
    """Run ``model(x, y)`` under ``poutine.block`` with a trace, returning the trace (as far
    as the program got) and the exception it raised, or ``None``.

    ``own_scope`` runs it in an empty scope of Pyro's parameter store (left as it was), where
    a ``PyroModule``'s parameters can only be its own. A :class:`ModelContractError` the
    program raises itself is raised as it is.
    """
    tracer = TraceMessenger()
    scope = pyro.get_param_store().scope() if own_scope else contextlib.nullcontext()
    try:
        with scope, poutine.block(), tracer:
            model(x, y)
    except ModelContractError:
        raise
    except Exception as err:
        return tracer.trace, err
    return tracer.trace, None


def opened_plates(trace: Trace) -> dict[str, PlateInfo]:
    """The plates a (possibly partial) trace shows the program opened, in order, by name."""
    plates: dict[str, PlateInfo] = {}
    nodes: dict[str, Any] = trace.nodes
    for name, site in nodes.items():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            plates[frame.name] = (int(frame.size), frame.dim)
        if site_is_subsample(site) and name not in plates:
            plates[name] = (int(site["value"].shape[0]), None)
    return plates


def _listed(plates: dict[str, PlateInfo]) -> str:
    if not plates:
        return "the program opened no plate"
    each = [
        f"{name!r} (size {size}" + (f", dim={dim})" if dim is not None else ")")
        for name, (size, dim) in plates.items()
    ]
    return "the program opened the plate(s) " + ", ".join(each)


def explain_missing_tasks_plate(
    model: Callable[..., Any],
    x: Tensor,
    y: Tensor | None,
    trace: Trace,
    failure: Exception | None,
) -> None:
    """Raise a :class:`ModelContractError` naming the plates the program opened when it has
    no ``pyro.plate("tasks")``, or its tasks plate at ``dim=-1`` made it fail; return when
    neither is the case (a failure then has another cause).

    When the run on the whole batch failed, the program is run again on its first task,
    where a missing tasks plate no longer breaks the shapes, to see the plates it opens.
    """
    plates = opened_plates(trace)
    if TASKS_PLATE in plates:
        size, dim = plates[TASKS_PLATE]
        if failure is not None and dim == -1:
            raise ModelContractError(
                f"running the model failed ({type(failure).__name__}, the cause above) inside "
                f"pyro.plate('tasks', {size}, dim=-1): with the tasks plate at the rightmost "
                "batch dimension, per-task values of shape (tasks,) do not broadcast against "
                "the points of each task (tasks, points). hierbayes reads observations as "
                "(tasks, points): put pyro.plate('tasks', T, dim=-2) outside and "
                f"pyro.plate('data', N, dim=-1) inside, e.g.\n{_EXAMPLE}\n"
                "        with pyro.plate('data', x.shape[1], dim=-1): ...\n"
                f"{CONTRACT}"
            ) from failure
        return
    if failure is not None:
        one, one_failure = run_model(model, x[:1], None if y is None else y[:1], own_scope=True)
        if one_failure is None:
            plates = opened_plates(one)
            if TASKS_PLATE in plates:
                return
        elif not plates:
            return  # it failed before opening any plate: nothing to say about plates
    close = difflib.get_close_matches(TASKS_PLATE, list(plates), n=1, cutoff=0.6)
    hint = f" (is {close[0]!r} meant to be it? its name must be exactly 'tasks')" if close else ""
    failed = (
        f"Running it on the batch failed ({type(failure).__name__}, the cause above), as "
        "programs without the tasks plate do once there is more than one task. "
        if failure is not None
        else ""
    )
    raise ModelContractError(
        f"the model has no pyro.plate('tasks', T): {_listed(plates)}{hint}. hierbayes needs "
        "one plate named 'tasks', of size T = x.shape[0] (the number of tasks), around the "
        f"per-task latent and its observations, e.g.\n{_EXAMPLE}\n{failed}{CONTRACT}"
    ) from failure


def support_violation(
    trace: Trace,
    structure: ObservedLayout,
    field: str,
    mask: Tensor | None = None,
    task_ids: Tensor | None = None,
) -> str | None:
    """The first observed value of ``trace`` outside its site's support, told as ``"support_y
    of task 3, point 1 is 7, outside the support of the observed site 'y' (Binomial with
    total_count 5: integers 0..5)"`` with how many tasks hold such values; ``None`` when every
    value is in its support.

    ``trace`` is a run of the program on the data (taken with validation off, so that it
    holds the values rather than stopping at them); ``mask`` ``(T, N)`` marks the real points
    (padding is not checked); ``task_ids`` name the tasks.
    """
    nodes: dict[str, Any] = trace.nodes
    for name in structure.observed_sites:
        fn, value = nodes[name]["fn"], nodes[name]["value"]
        support = fn.support
        ok = support.check(value)
        batch_ndim = ok.dim()
        tasks_axis = batch_ndim + structure.tasks_dim
        if tasks_axis < 0:
            continue  # not laid out by task: the contract checks report it
        data_dim = structure.data_dims.get(name)
        data_axis = None if data_dim is None else batch_ndim + data_dim
        if mask is not None and data_axis is not None:
            shape = [1] * batch_ndim
            shape[tasks_axis], shape[data_axis] = mask.shape
            ok = ok | ~mask.reshape(shape)
        bad = ~ok
        if not bool(bad.any()):
            continue
        order = [tasks_axis, *([] if data_axis is None else [data_axis])]
        order += [a for a in range(batch_ndim) if a not in order]
        first = tuple(int(i) for i in bad.permute(order).nonzero()[0])
        task = first[0] if task_ids is None else int(task_ids[first[0]])
        point = "" if data_axis is None else f", point {first[1]}"
        shown = _shown(
            value.expand(*bad.shape, *value.shape[batch_ndim:]).permute(
                *order, *range(batch_ndim, value.dim())
            )[first]
        )
        count = int(bad.movedim(tasks_axis, 0).reshape(bad.shape[tasks_axis], -1).any(1).sum())
        return (
            f"{field} of task {task}{point} is {shown}, outside the support of the observed "
            f"site {name!r} ({_describe_support(fn, bad.shape, order, first)}); "
            f"{count} task(s) of {bad.shape[tasks_axis]} hold such values"
        )
    return None


def _shown(value: Tensor) -> str:
    """A value as a number (``7``, ``-1``, ``0.5``) or a short list for an event."""
    numbers = [int(v) if float(v).is_integer() else float(v) for v in value.flatten().tolist()]
    if value.dim() == 0:
        return str(numbers[0])
    return str(numbers[:8])[:-1] + (", ...]" if len(numbers) > 8 else "]")


def _describe_support(fn: Any, shape: torch.Size, order: list[int], first: tuple[int, ...]) -> str:
    """``"Binomial with total_count 5: integers 0..5"``, ``"Bernoulli: 0 or 1"``, ... with the
    bounds at the offending entry."""
    base = fn
    while isinstance(base, (Independent, MaskedDistribution, ExpandedDistribution)):
        base = base.base_dist
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    name = type(base).__name__

    def at(bound: Any) -> int | float:
        t = torch.as_tensor(bound).expand(shape).permute(*order)[first]
        return int(t) if float(t).is_integer() else float(t)

    if support is constraints.boolean:
        return f"{name}: 0 or 1"
    if isinstance(support, constraints.integer_interval):
        low, high = at(support.lower_bound), at(support.upper_bound)
        detail = (
            f" with total_count {high}"
            if isinstance(base, dist.Binomial)
            else f" over {int(high) + 1} classes"
            if isinstance(base, dist.Categorical)
            else ""
        )
        return f"{name}{detail}: integers {low}..{high}"
    if isinstance(support, type(constraints.nonnegative_integer)):
        low = at(support.lower_bound)
        return f"{name}: integers {low}, {low + 1}, {low + 2}, ..."
    return f"{name}: {support}"
