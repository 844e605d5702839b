"""A fixed collection of tasks built from tensors or arrays, of equal or unequal sizes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.tasks.batch import TaskBatch

__all__ = ["TaskCollection"]

ArrayLike = Tensor | np.ndarray | Sequence[Any]
_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def _as_tensor(value: ArrayLike, field: str, task: int, dtype: torch.dtype | None = None) -> Tensor:
    try:
        t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise TaskDataError(f"{field} of task {task} cannot be read as an array: {err}") from err
    if torch.is_floating_point(t):
        t = t.to(dtype or torch.get_default_dtype())
    if t.dim() == 0:
        raise TaskDataError(f"{field} of task {task} is a scalar; expected (points, ...)")
    return t


def _pad(tensors: list[Tensor], length: int) -> Tensor:
    """Stack ``(n_j, ...)`` tensors into ``(T, length, ...)``, padding with each task's first point.

    Padding repeats a real point (not zeros), so a model evaluated on padded points stays in
    its domain; the mask keeps them out of every likelihood.
    """
    out = []
    for t in tensors:
        if t.shape[0] < length:
            filler = t[:1].expand(length - t.shape[0], *t.shape[1:])
            t = torch.cat([t, filler], dim=0)
        out.append(t)
    return torch.stack(out)


class TaskCollection:
    r"""A fixed, finite set of :math:`J` tasks.

    Build it from one tuple or mapping per task, ``(support_x, support_y, query_x, query_y)``
    with the point dimension first (tensors, arrays or nested lists); tasks may have different
    numbers of points, in which case batches are padded and carry masks. Or build it from
    rectangular ``(J, N, ...)`` tensors with :meth:`from_tensors`.

    Every task is checked once, here: sizes, shapes and finiteness, each error naming the task.
    Floating-point data is stored in ``dtype`` (default: torch's default dtype, so float64
    arrays become float32 unless you ask for float64).
    """

    def __init__(
        self,
        tasks: Sequence[Sequence[ArrayLike] | Mapping[str, ArrayLike]],
        *,
        require_query: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if len(tasks) == 0:
            raise TaskDataError("a TaskCollection needs at least one task; got none")
        columns: dict[str, list[Tensor]] = {f: [] for f in _FIELDS}
        query_flags: list[bool] = []
        for j, task in enumerate(tasks):
            if isinstance(task, Mapping):
                unknown = set(task) - set(_FIELDS)
                if unknown:
                    raise TaskDataError(
                        f"task {j} has unknown fields {sorted(unknown)}; expected {list(_FIELDS)}"
                    )
                values = [task.get(f) for f in _FIELDS]
            else:
                if isinstance(task, (Tensor, np.ndarray)) or not isinstance(task, Sequence):
                    shape = getattr(task, "shape", None)
                    raise TaskDataError(
                        f"task {j} is a {type(task).__name__}"
                        + (f" of shape {tuple(shape)}" if shape is not None else "")
                        + ", not a task: a TaskCollection takes one (support_x, support_y, "
                        "query_x, query_y) tuple (or dict) per task. For arrays with the task "
                        "dimension first, use TaskCollection.from_tensors(support_x, support_y, "
                        "query_x, query_y)"
                    )
                if len(task) not in (2, 4):
                    raise TaskDataError(
                        f"task {j} has {len(task)} entries; expected (support_x, support_y) or "
                        "(support_x, support_y, query_x, query_y)"
                    )
                values = [*task, None, None][:4]
            if values[0] is None or values[1] is None:
                raise TaskDataError(f"task {j} is missing support_x or support_y")
            if (values[2] is None) != (values[3] is None):
                raise TaskDataError(
                    f"task {j} has only one of query_x and query_y; give both or neither"
                )
            if require_query and values[2] is None:
                raise TaskDataError(
                    f"task {j} has no query set, which meta-training needs; pass "
                    "(support_x, support_y, query_x, query_y), or require_query=False for "
                    "adaptation-only collections"
                )
            query_flags.append(values[2] is not None)
            if query_flags[-1] != query_flags[0]:
                raise TaskDataError(
                    f"task {j} {'has' if query_flags[-1] else 'lacks'} a query set but task 0 "
                    f"{'has' if query_flags[0] else 'lacks'} one: either every task has a query "
                    "set or none does"
                )
            for f, v in zip(_FIELDS, values, strict=True):
                if v is not None:
                    columns[f].append(_as_tensor(v, f, j, dtype))
            self._check_task(j, columns, has_query=query_flags[-1])
        _check_finite(columns)
        self._columns = columns
        self.has_query = query_flags[0]
        #: The group of each task when built by :meth:`from_groups`, in task order.
        self.group_labels: list[Any] | None = None

    @classmethod
    def from_tensors(
        cls,
        support_x: ArrayLike,
        support_y: ArrayLike,
        query_x: ArrayLike | None = None,
        query_y: ArrayLike | None = None,
        **kwargs: Any,
    ) -> TaskCollection:
        """From rectangular ``(J, N, ...)`` tensors or arrays."""
        arrays = [support_x, support_y, query_x, query_y]
        dtype = kwargs.get("dtype")
        tensors = [
            None if a is None else _as_tensor(a, f, 0, dtype)
            for a, f in zip(arrays, _FIELDS, strict=True)
        ]
        J = tensors[0].shape[0]  # type: ignore[union-attr]
        for f, t in zip(_FIELDS, tensors, strict=True):
            if t is not None and t.shape[0] != J:
                raise TaskDataError(f"{f} has {t.shape[0]} tasks but support_x has {J}")
        tasks = [[t[j] for t in tensors if t is not None] for j in range(J)]
        return cls(tasks, **kwargs)

    @classmethod
    def from_groups(
        cls,
        groups: ArrayLike,
        x: ArrayLike,
        y: ArrayLike,
        *,
        dtype: torch.dtype | None = None,
    ) -> TaskCollection:
        """Groups as tasks from a table: one row per observation, ``groups`` ``(n,)`` the
        group of each row (any labels: county names, ids), ``x`` ``(n, ...)`` and ``y``
        ``(n, ...)`` its inputs and targets (e.g. columns of a data frame as arrays). Each
        group becomes a task with all its rows as the support set and no query set (empirical
        Bayes fits it with ``method="llama", objective="evidence"``), in the order the groups
        first appear; ``group_labels`` keeps that order."""
        labels = np.asarray(groups)
        xs, ys = np.asarray(x), np.asarray(y)
        if labels.ndim != 1 or xs.shape[0] != labels.shape[0] or ys.shape[0] != labels.shape[0]:
            raise TaskDataError(
                f"groups, x and y need one row per observation: got groups of shape "
                f"{labels.shape}, x {xs.shape} and y {ys.shape}"
            )
        order = list(dict.fromkeys(labels.tolist()))
        tasks = [(xs[labels == g], ys[labels == g]) for g in order]
        collection = cls(tasks, require_query=False, dtype=dtype)
        collection.group_labels = order
        return collection

    @staticmethod
    def _check_task(j: int, columns: dict[str, list[Tensor]], *, has_query: bool) -> None:
        sets = [("support", "support_x", "support_y")]
        if has_query:
            sets.append(("query", "query_x", "query_y"))
        for prefix, fx, fy in sets:
            x, y = columns[fx][-1], columns[fy][-1]
            if x.shape[0] != y.shape[0]:
                raise TaskDataError(
                    f"task {j}: {fx} has {x.shape[0]} points but {fy} has {y.shape[0]}; each "
                    "input needs one target"
                )
            if x.shape[0] == 0:
                raise TaskDataError(
                    f"task {j} has an empty {prefix} set: every task needs at least one "
                    f"{prefix} point (leave the task out, or give it none of both query arrays "
                    "with require_query=False)"
                )
            ref_x, ref_y = columns[fx][0], columns[fy][0]
            for field, t, ref in ((fx, x, ref_x), (fy, y, ref_y)):
                if t.dtype != ref.dtype:
                    raise TaskDataError(
                        f"task {j}: {field} is {t.dtype} but task 0's is {ref.dtype}: give every "
                        f"task's {field} the same kind of values (floating point, or integer "
                        "labels)"
                    )
            if x.shape[1:] != ref_x.shape[1:] or y.shape[1:] != ref_y.shape[1:]:
                raise TaskDataError(
                    f"task {j}: {fx} points have shape {tuple(x.shape[1:])} and {fy} "
                    f"{tuple(y.shape[1:])}, but task 0 has {tuple(ref_x.shape[1:])} and "
                    f"{tuple(ref_y.shape[1:])}"
                )

    # -- the task-source protocol --------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self._columns["support_x"])

    def __len__(self) -> int:
        return self.num_tasks

    @property
    def is_ragged(self) -> bool:
        """Whether tasks differ in their numbers of points (batches then carry masks)."""
        return any(len({t.shape[0] for t in col}) > 1 for col in self._columns.values() if col)

    def batch(self, index: Sequence[int] | Tensor | None = None) -> TaskBatch:
        """The tasks at ``index`` (all of them by default) as one, possibly masked, batch."""
        if index is None:
            idx = list(range(self.num_tasks))
        elif isinstance(index, Tensor):
            idx = [int(i) for i in index.tolist()]
        else:
            idx = [int(i) for i in index]
        for i in idx:
            if not 0 <= i < self.num_tasks:
                raise IndexError(f"task index {i} out of range for {self.num_tasks} tasks")
        out: dict[str, Tensor | None] = {}
        for prefix in ("support", "query"):
            xs = (
                [self._columns[f"{prefix}_x"][i] for i in idx]
                if self._columns[f"{prefix}_x"]
                else []
            )
            ys = (
                [self._columns[f"{prefix}_y"][i] for i in idx]
                if self._columns[f"{prefix}_y"]
                else []
            )
            if not xs:
                out[f"{prefix}_x"] = out[f"{prefix}_y"] = out[f"{prefix}_mask"] = None
                continue
            lengths = torch.tensor([x.shape[0] for x in xs])
            n = int(lengths.max())
            out[f"{prefix}_x"] = _pad(xs, n)
            out[f"{prefix}_y"] = _pad(ys, n)
            ragged = bool((lengths != n).any())
            out[f"{prefix}_mask"] = (
                (torch.arange(n)[None, :] < lengths[:, None]) if ragged else None
            )
        return TaskBatch(task_ids=torch.tensor(idx), validate=False, **out)  # type: ignore[arg-type]

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        """``num_tasks`` distinct tasks drawn uniformly (all of them if ``num_tasks >= J``)."""
        if num_tasks >= self.num_tasks:
            index = torch.randperm(self.num_tasks, generator=generator)
        else:
            index = torch.randperm(self.num_tasks, generator=generator)[:num_tasks]
        batch = self.batch(index)
        return batch.to(dtype=dtype) if dtype is not None else batch


def _check_finite(columns: dict[str, list[Tensor]]) -> None:
    """Raise :class:`TaskDataError` if any task holds NaN or infinity: the first such value by
    field, task and point, and how many of the collection's tasks hold any (all tasks are
    checked before the error is raised, so the count is the collection's)."""
    bad_tasks: list[int] = []
    first: tuple[str, int, Tensor] | None = None
    for j in range(len(columns["support_x"])):
        for field in _FIELDS:
            if field not in columns or j >= len(columns[field]):
                continue
            value = columns[field][j]
            if not torch.is_floating_point(value) or bool(torch.isfinite(value).all()):
                continue
            if first is None:
                first = (field, j, value)
            if not bad_tasks or bad_tasks[-1] != j:
                bad_tasks.append(j)
    if first is None:
        return
    field, j, value = first
    index = tuple(int(i) for i in (~torch.isfinite(value)).nonzero()[0])
    shown = ", ".join(map(str, bad_tasks[:10])) + (", ..." if len(bad_tasks) > 10 else "")
    raise TaskDataError(
        f"{field} of task {j}, point {index[0]} is {value[index].item()}: every value must be "
        f"finite ({len(bad_tasks)} task(s) of {len(columns['support_x'])} hold NaN or inf: "
        f"tasks {shown}). Remove or repair those tasks before training; hierbayes does not "
        "train on them silently."
    )
