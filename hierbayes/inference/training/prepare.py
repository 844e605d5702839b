r"""What ``fit`` does before the run: the device, the first batch of tasks, and a warning that
waits until every check has passed."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from hierbayes.inference.training.config import OptimConfig, RunConfig
from hierbayes.tasks.batch import TaskBatch

__all__ = ["first_batch", "resolve_device", "warn_if_batch_too_large"]


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
    return dev


def first_batch(
    source: Any, optim: OptimConfig, run: RunConfig, dev: torch.device, generator: torch.Generator
) -> TaskBatch:
    first = source.sample(optim.meta_batch_size, generator=generator, dtype=run.dtype)
    return TaskBatch(
        first.support_x,
        first.support_y,
        first.query_x,
        first.query_y,
        first.support_mask,
        first.query_mask,
        first.task_ids,
        first.info,
    ).to(dev)  # re-validated


def warn_if_batch_too_large(source: Any, tasks: Any, optim: OptimConfig) -> None:
    """Said once every check passed: a run that will fail is told why, not this."""
    if (
        not isinstance(tasks, TaskBatch)  # one batch given: training on all of it is the point
        and source.num_tasks is not None
        and optim.meta_batch_size > source.num_tasks
    ):
        warnings.warn(
            f"meta_batch_size={optim.meta_batch_size} is larger than the {source.num_tasks} "
            f"tasks available: every meta-step uses all {source.num_tasks}",
            UserWarning,
            stacklevel=5,
        )
