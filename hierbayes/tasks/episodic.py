r"""Episodic N-way K-shot tasks over any labelled dataset (Vinyals et al. 2016; Finn et al. 2017).

An episode picks ``ways`` classes at random, relabels them ``0..ways-1`` in random order, and
draws ``shots`` support and ``query_shots`` query examples of each, without replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.tasks.batch import TaskBatch

__all__ = ["EpisodicSampler"]


class EpisodicSampler:
    r"""Endless N-way K-shot classification episodes.

    Parameters
    ----------
    inputs:
        ``(M, *input_shape)`` examples, a tensor or array, or a sequence of ``(input, label)``
        pairs such as a ``torch.utils.data.Dataset`` (then ``labels`` is ``None``).
    labels:
        ``(M,)`` integer class labels.
    ways, shots, query_shots:
        Classes per episode, and support and query examples per class.

    Notes
    -----
    Support and query sets are ordered class by class: ``support_y`` of every episode is
    ``[0]*shots + [1]*shots + ...``, with the class-to-label map drawn anew per episode.
    """

    def __init__(
        self,
        inputs: Tensor | np.ndarray | Sequence[Any],
        labels: Tensor | np.ndarray | Sequence[int] | None = None,
        *,
        ways: int,
        shots: int,
        query_shots: int = 15,
    ) -> None:
        if labels is None:
            pairs = list(inputs)
            if not pairs:
                raise TaskDataError("the dataset is empty")
            xs = torch.stack([torch.as_tensor(np.asarray(p[0])) for p in pairs])
            ys = torch.as_tensor([int(p[1]) for p in pairs])
        else:
            xs = inputs if isinstance(inputs, Tensor) else torch.as_tensor(np.asarray(inputs))
            ys = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
        if ys.dim() != 1 or ys.shape[0] != xs.shape[0]:
            raise TaskDataError(
                f"labels must have shape ({xs.shape[0]},), one per input; got {tuple(ys.shape)}"
            )
        if ys.is_floating_point():
            raise TaskDataError(f"labels must be integers; got {ys.dtype}")
        if not torch.is_floating_point(xs):
            # e.g. uint8 images: networks take floating-point inputs (values are kept, not scaled)
            xs = xs.to(torch.get_default_dtype())
        xs = xs.to(torch.get_default_dtype())
        _check_finite_inputs(xs)
        if ways < 2 or shots < 1 or query_shots < 0:
            raise ValueError(
                f"need ways >= 2, shots >= 1, query_shots >= 0; got {ways}, {shots}, {query_shots}"
            )
        self.inputs, self.labels = xs, ys
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        classes, counts = torch.unique(ys, return_counts=True)
        need = shots + query_shots
        short = classes[counts < need]
        if len(short) > 0:
            raise TaskDataError(
                f"class {int(short[0])} has {int(counts[counts < need][0])} examples but an episode "
                f"needs {need} per class (shots={shots} + query_shots={query_shots}); "
                f"{len(short)} of {len(classes)} classes are short. Lower shots/query_shots or "
                "drop those classes."
            )
        if len(classes) < ways:
            raise TaskDataError(f"the dataset has {len(classes)} classes but ways={ways}")
        self.classes = classes
        self._members = [torch.nonzero(ys == c).squeeze(1) for c in classes]

    @property
    def num_tasks(self) -> None:
        """``None``: episodes are endless."""
        return None

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        """``num_tasks`` episodes; ``info["classes"]`` ``(T, ways)`` holds the original labels."""
        k, q, n = self.shots, self.query_shots, self.ways
        support_idx, query_idx, chosen = [], [], []
        for _ in range(num_tasks):
            cls = torch.randperm(len(self.classes), generator=generator)[:n]
            chosen.append(self.classes[cls])
            s, qq = [], []
            for c in cls.tolist():
                members = self._members[c]
                pick = members[torch.randperm(len(members), generator=generator)[: k + q]]
                s.append(pick[:k])
                qq.append(pick[k:])
            support_idx.append(torch.cat(s))
            query_idx.append(torch.cat(qq))
        s_idx, q_idx = torch.stack(support_idx), torch.stack(query_idx)
        labels_s = torch.arange(n).repeat_interleave(k).expand(num_tasks, -1).clone()
        labels_q = torch.arange(n).repeat_interleave(q).expand(num_tasks, -1).clone()
        xs, xq = self.inputs[s_idx], self.inputs[q_idx]
        if dtype is not None and torch.is_floating_point(xs):
            xs, xq = xs.to(dtype), xq.to(dtype)
        return TaskBatch(
            support_x=xs,
            support_y=labels_s,
            query_x=xq if q > 0 else None,
            query_y=labels_q if q > 0 else None,
            info={"classes": torch.stack(chosen)},
            validate=False,
        )


def _check_finite_inputs(inputs: Tensor) -> None:
    """Raise :class:`TaskDataError` naming the first input (by its place in the dataset) that
    holds NaN or infinity, and how many of the inputs do."""
    bad = ~torch.isfinite(inputs.reshape(inputs.shape[0], -1))
    rows = bad.any(dim=1)
    if not bool(rows.any()):
        return
    i = int(rows.nonzero()[0])
    value = inputs.reshape(inputs.shape[0], -1)[i][bad[i]][0].item()
    raise TaskDataError(
        f"inputs[{i}] holds {value}: every input must be finite ({int(rows.sum())} of "
        f"{inputs.shape[0]} inputs hold NaN or inf). Remove or repair them before sampling "
        "episodes."
    )
