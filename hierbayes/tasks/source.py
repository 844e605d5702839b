"""The task-source protocol that :func:`hierbayes.inference.fit` draws meta-batches from."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from hierbayes.tasks.batch import TaskBatch

__all__ = ["TaskSource", "as_batch"]


@runtime_checkable
class TaskSource(Protocol):
    """Anything that draws batches of tasks.

    ``num_tasks`` is the number of distinct tasks ``J`` for a fixed collection and ``None`` for
    an endless family; empirical Bayes weighs the hyperprior by ``1/J`` (see
    :class:`hierbayes.inference.MAMLObjective`).
    """

    @property
    def num_tasks(self) -> int | None: ...

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch: ...


def as_batch(tasks: object, needed_for: str) -> TaskBatch:
    """All of a finite task set as one :class:`TaskBatch`: a batch as it is, a collection
    (anything with ``batch()``, as :class:`~hierbayes.tasks.TaskCollection`) all at once.

    Raises ``TypeError`` naming ``needed_for`` for an endless family or anything else."""
    if isinstance(tasks, TaskBatch):
        return tasks
    batch = getattr(tasks, "batch", None)
    if callable(batch) and getattr(tasks, "num_tasks", None) is not None:
        whole = batch()
        if isinstance(whole, TaskBatch):
            return whole
    raise TypeError(
        f"{needed_for} needs a finite set of tasks: a TaskBatch or a TaskCollection (e.g. "
        f"radon_tasks()); got {type(tasks).__name__}. For an endless family draw a batch first: "
        "tasks.sample(T, generator=torch.Generator().manual_seed(0))"
    )
