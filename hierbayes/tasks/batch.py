r"""A batch of ``T`` few-shot tasks, task dimension first.

Task :math:`j` has a support set :math:`(x^s_j, y^s_j)` of :math:`N` points, used to adapt
:math:`\phi_j`, and a query set :math:`(x^q_j, y^q_j)` of :math:`M` points, used to score the
adapted parameters (Finn et al. 2017; Grant et al. 2018, eq. 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from hierbayes.errors import TaskDataError, check_finite

__all__ = ["TaskBatch"]


@dataclass(frozen=True)
class TaskBatch:
    r"""Support and query sets of ``T`` tasks.

    Parameters
    ----------
    support_x:
        ``(T, N, *input_shape)`` support inputs.
    support_y:
        ``(T, N, *target_shape)`` support targets (``(T, N)`` integer labels for classification).
    query_x, query_y:
        ``(T, M, ...)`` query set, or both ``None`` for adaptation-only batches.
    support_mask, query_mask:
        Optional ``(T, N)`` / ``(T, M)`` boolean masks, ``True`` where a point is real. Tasks of
        unequal sizes are padded to a common size and masked; padded points never enter a
        likelihood.
    task_ids:
        Optional ``(T,)`` integer ids of the tasks in their source, used in error messages.
    info:
        Optional per-task metadata, each ``(T, ...)`` (e.g. the sinusoid's amplitude and phase).
    validate:
        Check shapes and finiteness now (default). Sources that made and checked the data
        themselves pass ``False``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor | None = None
    query_y: Tensor | None = None
    support_mask: Tensor | None = None
    query_mask: Tensor | None = None
    task_ids: Tensor | None = None
    info: Mapping[str, Tensor] = field(default_factory=dict)
    validate: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.validate:
            self._validate()

    # -- properties --------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return int(self.support_x.shape[0])

    @property
    def has_query(self) -> bool:
        return self.query_x is not None

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def require_query(self, purpose: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(query_x, query_y, query_mask)``, or a :class:`TaskDataError` naming ``purpose``."""
        if self.query_x is None or self.query_y is None:
            raise TaskDataError(
                f"{purpose} needs a query set, but this batch of {self.num_tasks} tasks has none "
                "(query_x and query_y are None). Build the batch with query_x and query_y, or "
                "split each task's points into support and query sets."
            )
        return self.query_x, self.query_y, self.query_mask

    # -- transformations ---------------------------------------------------------------------

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> TaskBatch:
        """Move every tensor to ``device``; floating-point tensors also to ``dtype``."""
        target = None if device is None else torch.device(device)
        current = self.support_x.device
        same_device = (
            target is None
            or target == current
            or (target.index is None and target.type == current.type)
        )
        floats = [
            t
            for t in (self.support_x, self.support_y, self.query_x, self.query_y)
            if t is not None and torch.is_floating_point(t)
        ]
        same_dtype = dtype is None or all(t.dtype == dtype for t in floats)
        if same_device and same_dtype:
            return self

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if dtype is not None and torch.is_floating_point(t):
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        changes: dict[str, Any] = {
            f.name: move(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("info", "validate")
        }
        changes["info"] = {k: move(v) for k, v in self.info.items()}
        return replace(self, validate=False, **changes)

    def select(self, index: Tensor | slice | list[int]) -> TaskBatch:
        """The tasks at ``index`` (along the task dimension)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        changes: dict[str, Any] = {
            f.name: pick(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("info", "validate")
        }
        changes["info"] = {k: v[index] for k, v in self.info.items()}
        return replace(self, validate=False, **changes)

    def __len__(self) -> int:
        return self.num_tasks

    # -- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        sx = self.support_x
        for name in ("support_x", "support_y"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TaskDataError(
                    f"{name} must be a torch.Tensor of shape (tasks, points, ...); got "
                    f"{type(t).__name__} (arrays and lists: TaskCollection.from_tensors or "
                    "torch.as_tensor)"
                )
            if t.dim() < 2:
                raise TaskDataError(
                    f"{name} must have shape (tasks, points, ...) with the task dimension first; "
                    f"got shape {tuple(t.shape)}"
                )
        if (self.query_x is None) != (self.query_y is None):
            missing = "query_y" if self.query_y is None else "query_x"
            raise TaskDataError(f"{missing} is missing: give both query_x and query_y, or neither.")
        T = sx.shape[0]
        if T == 0:
            raise TaskDataError(
                f"the batch has no tasks: support_x has shape {tuple(sx.shape)}; expected at "
                "least one task along the first dimension"
            )
        pairs = [("support", sx, self.support_y, self.support_mask)]
        if self.query_x is not None and self.query_y is not None:
            for name in ("query_x", "query_y"):
                t = getattr(self, name)
                if not isinstance(t, Tensor) or t.dim() < 2:
                    raise TaskDataError(
                        f"{name} must be a tensor of shape (tasks, points, ...); got "
                        f"{getattr(t, 'shape', type(t).__name__)}"
                    )
            pairs.append(("query", self.query_x, self.query_y, self.query_mask))
        self._check_devices_and_dtypes()
        for prefix, x, y, mask in pairs:
            if x.shape[0] != T or y.shape[0] != T:
                raise TaskDataError(
                    f"{prefix}_x has {x.shape[0]} tasks and {prefix}_y has {y.shape[0]}; "
                    f"support_x has {T}: every tensor needs the same number of tasks first."
                )
            if x.shape[1] != y.shape[1]:
                raise TaskDataError(
                    f"{prefix}_x has {x.shape[1]} points per task but {prefix}_y has "
                    f"{y.shape[1]} (shapes {tuple(x.shape)} and {tuple(y.shape)}): each task "
                    "needs one target per input."
                )
            if x.shape[1] == 0:
                hint = (
                    " (for adaptation only, give query_x=None and query_y=None)"
                    if prefix == "query"
                    else ""
                )
                raise TaskDataError(
                    f"{prefix}_x has no points (shape {tuple(x.shape)}): every task needs at "
                    f"least one {prefix} point{hint}"
                )
            if prefix == "query" and x.shape[2:] != sx.shape[2:]:
                raise TaskDataError(
                    f"query_x points have shape {tuple(x.shape[2:])} but support_x points have "
                    f"{tuple(sx.shape[2:])}: support and query inputs need the same features"
                )
            if mask is not None:
                if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                    raise TaskDataError(
                        f"{prefix}_mask must be a boolean tensor of shape {tuple(x.shape[:2])}; "
                        f"got {mask.dtype} {tuple(mask.shape)}"
                    )
                empty = (~mask.any(dim=1)).nonzero()
                if len(empty) > 0:
                    raise TaskDataError(
                        f"{self._task_name(int(empty[0]))} has no {prefix} points ({prefix}_mask "
                        f"is all False; {len(empty)} task(s) of {T}): every task needs at least "
                        f"one {prefix} point"
                    )
            check_finite(f"{prefix}_x", x, task_ids=self.task_ids)
            check_finite(f"{prefix}_y", y, task_ids=self.task_ids)
        if self.task_ids is not None and self.task_ids.shape != (T,):
            raise TaskDataError(
                f"task_ids must have shape ({T},); got {tuple(self.task_ids.shape)}"
            )
        for key, value in self.info.items():
            if value.shape[0] != T:
                raise TaskDataError(
                    f"info[{key!r}] must have {T} rows, one per task; got {value.shape[0]}"
                )

    def _task_name(self, j: int) -> str:
        """Task ``j`` of the batch, by its id in its source where known."""
        return f"task {int(self.task_ids[j])}" if self.task_ids is not None else f"task {j}"

    def _check_devices_and_dtypes(self) -> None:
        """Every tensor on support_x's device; every floating-point data tensor in one dtype."""
        tensors = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        tensors.update({f"info[{k!r}]": v for k, v in self.info.items()})
        device = self.support_x.device
        for name, t in tensors.items():
            if t.device != device:
                raise TaskDataError(
                    f"{name} is on {t.device} but support_x is on {device}: every tensor of a "
                    "batch must be on one device (move them with .to(device))"
                )
        data = ("support_x", "support_y", "query_x", "query_y")
        floats = [(n, tensors[n]) for n in data if n in tensors and tensors[n].is_floating_point()]
        for name, t in floats[1:]:
            first, reference = floats[0]
            if t.dtype != reference.dtype:
                raise TaskDataError(
                    f"{name} is {t.dtype} but {first} is {reference.dtype}: the floating-point "
                    f"tensors of a batch need one dtype (convert with .to({reference.dtype}), or "
                    "build the batch from arrays with TaskCollection(..., dtype=...))"
                )
