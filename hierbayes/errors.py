"""Errors raised on bad input, each naming the field, the task and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "HierbayesError",
    "ModelContractError",
    "NumericalError",
    "TaskDataError",
    "UnconvergedWarning",
    "check_finite",
]


class HierbayesError(Exception):
    """Base class of the errors hierbayes raises on purpose."""


class TaskDataError(HierbayesError, ValueError):
    """Task data that cannot be trained or evaluated on (NaN, mismatched sizes, missing sets)."""


class ModelContractError(HierbayesError, ValueError):
    """A Pyro program that does not follow the hierbayes model contract.

    The contract: ``model(x, y=None)`` over a batch of tasks, with global latents (such as
    ``theta``) outside every plate, exactly one per-task latent inside
    ``pyro.plate("tasks", T)``, and observed sites inside that plate (usually in a nested
    data plate).
    """


class NumericalError(HierbayesError, FloatingPointError):
    """A computation produced non-finite values or lost positive definiteness."""


class UnconvergedWarning(UserWarning):
    """An optimisation (``fit``'s, ``hyper_laplace``'s) stopped before its convergence criterion
    was met; the result records why."""


def check_finite(field: str, value: Tensor, *, task_ids: Tensor | None = None) -> None:
    """Raise :class:`TaskDataError` if ``value`` ``(T, ...)`` holds NaN or infinity.

    The message names ``field``, the first offending task (its id in ``task_ids`` when
    given) and point.
    """
    if not torch.is_floating_point(value) and not torch.is_complex(value):
        return
    bad = ~torch.isfinite(value)
    if not bool(bad.any()):
        return
    index = tuple(int(i) for i in bad.nonzero()[0])
    task = index[0]
    name = f"task {int(task_ids[task])}" if task_ids is not None else f"task {task}"
    where = f", point {index[1]}" if len(index) > 1 else ""
    bad_value = value[index].item()
    count = int(bad.reshape(bad.shape[0], -1).any(dim=1).sum())
    raise TaskDataError(
        f"{field} of {name}{where} is {bad_value}: every value must be finite "
        f"({count} task(s) of {value.shape[0]} hold NaN or inf). Remove or repair those tasks "
        "before training; hierbayes does not train on them silently."
    )
