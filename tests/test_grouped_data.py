"""One's own grouped data as tasks: a table (one row per observation, a group column) becomes a
query-less task collection that empirical Bayes fits, with groups of unequal sizes masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierbayes.errors import TaskDataError
from hierbayes.inference import fit
from hierbayes.models import VaryingIntercepts
from hierbayes.tasks import TaskCollection


def _table(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {"north": 7, "south": 2, "east": 11, "west": 1, "centre": 5}
    groups = np.concatenate([[g] * n for g, n in sizes.items()])
    rng.shuffle(groups)
    effect = {g: rng.normal(1.0, 0.7) for g in sizes}
    floor = rng.integers(0, 2, size=groups.size).astype(float)
    y = np.array([effect[g] for g in groups]) - 0.6 * floor + rng.normal(0, 0.5, groups.size)
    return groups, floor[:, None], y


def test_a_table_becomes_one_task_per_group_in_first_appearance_order() -> None:
    groups, x, y = _table()
    tasks = TaskCollection.from_groups(groups, x, y)
    assert tasks.num_tasks == 5 and not tasks.has_query
    assert tasks.group_labels == list(dict.fromkeys(groups.tolist()))
    batch = tasks.batch()
    assert batch.support_mask is not None  # unequal group sizes are padded and masked
    for j, label in enumerate(tasks.group_labels):
        rows = groups == label
        n = int(rows.sum())
        assert int(batch.support_mask[j].sum()) == n
        assert torch.equal(batch.support_y[j, :n], torch.as_tensor(y[rows]))


def test_empirical_bayes_fits_ones_own_groups() -> None:
    groups, x, y = _table()
    tasks = TaskCollection.from_groups(groups, x, y)
    result = fit(VaryingIntercepts(1), tasks, "llama", objective="evidence", progress=False)
    assert result.convergence is not None and result.convergence.converged
    assert -1.5 < float(result.params["w"]) < 0.3


def test_rows_that_do_not_line_up_are_refused() -> None:
    groups, x, y = _table()
    with pytest.raises(TaskDataError, match="one row per observation"):
        TaskCollection.from_groups(groups[:-1], x, y)
