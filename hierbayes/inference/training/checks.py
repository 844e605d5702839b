r"""Checks ``fit`` makes before any training: arguments, task sources, data against the model."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pyro
import torch
from pyro import poutine
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.inference.svi.guide import TruncatedGradientGuide
from hierbayes.inference.training.methods import Method
from hierbayes.models.density import NetworkDensity
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection
from hierbayes.tasks.source import TaskSource

__all__ = [
    "as_task_source",
    "check_arguments",
    "check_dtype",
    "check_targets",
    "reset_param_sites",
    "trainable_parameters",
]


def check_arguments(
    spec: Method,
    meta_steps: int,
    meta_batch_size: int,
    lr: float,
    guide_options: Mapping[str, Any],
    control: Any,
    method_options: Mapping[str, Any],
) -> None:
    """Refuse bad settings before anything is built, naming the argument and what it takes."""
    if not isinstance(meta_steps, int) or meta_steps < 0:
        raise ValueError(f"meta_steps must be a whole number >= 0; got {meta_steps!r}")
    if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be a whole number >= 1; got {meta_batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    step_size = guide_options["step_size"]
    if not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ValueError(f"step_size must be a positive number; got {step_size!r}")
    if control.clip_grad_norm is not None and not control.clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be positive; got {control.clip_grad_norm!r}")
    if control.checkpoint_every is not None:
        if control.checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint=PATH, where to write them")
        if control.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1; got {control.checkpoint_every}")
    known = spec.options
    if known is None:
        return
    for name in method_options:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"fit got an option {name!r} that method {spec.name!r} does not take{hint} "
                f"Its options: {sorted(known)}"
            )


def as_task_source(tasks: Any) -> Any:
    """A task source from what ``fit`` was given: a source, one batch, or a list of tasks."""
    if isinstance(tasks, TaskBatch):
        return _BatchSource(tasks)
    if isinstance(tasks, TaskSource):
        return tasks
    if isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)) and len(tasks) > 0:
        try:
            return TaskCollection(tasks)
        except TaskDataError:
            raise
        except Exception as err:
            raise TypeError(
                "tasks given as a list must be tasks as TaskCollection takes them: "
                "(support_x, support_y, query_x, query_y) tuples or dicts of arrays; "
                f"{type(err).__name__}: {err}"
            ) from err
    raise TypeError(
        "tasks must be a TaskBatch, a list of tasks (as TaskCollection takes them) or a task "
        f"source with sample(num_tasks, generator=...); got {type(tasks).__name__}"
    )


class _BatchSource:
    """A fixed :class:`TaskBatch` as a task source (random subsets of its tasks)."""

    def __init__(self, batch: TaskBatch) -> None:
        self.batch = batch

    @property
    def num_tasks(self) -> int:
        return self.batch.num_tasks

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        index = torch.randperm(self.batch.num_tasks, generator=generator)[:num_tasks]
        out = self.batch.select(index.to(self.batch.device))
        return out.to(dtype=dtype) if dtype is not None else out


def check_dtype(model: Any, batch: TaskBatch, dtype: torch.dtype | None) -> None:
    """A float data/model mismatch, caught here with advice rather than deep inside the model."""
    if not isinstance(model, torch.nn.Module) or not torch.is_floating_point(batch.support_x):
        return
    floats = [t for t in (*model.parameters(), *model.buffers()) if torch.is_floating_point(t)]
    if floats and floats[0].dtype != batch.support_x.dtype:
        raise TaskDataError(
            f"support_x is {batch.support_x.dtype} but the model is {floats[0].dtype}: pass "
            f"dtype={batch.support_x.dtype} to fit (model and data are then converted together), "
            "or convert the data"
        )


def reset_param_sites(model: Any, batch: TaskBatch) -> None:
    """Forget the ``pyro.param`` values a function model left in Pyro's global store, so that
    ``fit`` starts from their initial values (reproducible with ``seed``) rather than from
    whatever an earlier run trained."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(batch.support_x, batch.support_y)
    store = pyro.get_param_store()
    for name, site in trace.nodes.items():
        if site["type"] == "param" and name in store:
            del store[name]


def check_targets(guide: TruncatedGradientGuide, batch: TaskBatch) -> None:
    """Score one task's support and query sets once, so that targets of the wrong shape or kind
    are reported by field before training."""
    params = guide.global_values()
    one = batch.select(slice(0, 1))
    phi = guide.density.prior_mean({k: v.detach() for k, v in params.items()}, one.support_x)
    xq, yq, mq = one.require_query("meta-training")
    assert batch.query_y is not None
    if isinstance(guide.density, NetworkDensity):  # batch norm cannot take unequal task sizes
        guide.density.check_mask(batch.support_mask)
        guide.density.check_mask(batch.query_mask)
    for name, x, y, mask, full in (
        ("support_y", one.support_x, one.support_y, one.support_mask, batch.support_y),
        ("query_y", xq, yq, mq, batch.query_y),
    ):
        try:
            with torch.no_grad():
                guide.density.log_likelihood(params, phi.detach(), x, y, mask)
        except TaskDataError as err:
            raise TaskDataError(
                f"{name} (shape {tuple(full.shape)}) does not fit the model; for task 0: {err}"
            ) from err


def trainable_parameters(model: Any, guide: TruncatedGradientGuide) -> list[Tensor]:
    """The guide's parameters, the model's own, and ``pyro.param`` sites of a function model."""
    seen: dict[int, Tensor] = {}
    for p in guide.parameters():
        seen[id(p)] = p
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            seen[id(p)] = p
    store = pyro.get_param_store()
    for name in guide.structure.param_sites:
        if name in store:
            # pyro.param values carry their unconstrained tensor as an attribute
            p = cast(Any, store.get_param(name)).unconstrained()
            seen[id(p)] = p
    return [p for p in seen.values() if p.requires_grad]
