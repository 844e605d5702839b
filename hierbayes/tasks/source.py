"""The task-source protocol that :func:`hierbayes.inference.fit` draws meta-batches from."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from hierbayes.tasks.batch import TaskBatch

__all__ = ["TaskSource"]


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
