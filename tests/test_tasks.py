"""Task batches and sources: shapes, masks, seeding, devices and errors on bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hierbayes.errors import TaskDataError
from hierbayes.tasks import EpisodicSampler, SinusoidTasks, TaskBatch, TaskCollection


def test_sinusoid_tasks_follow_the_family_and_are_seeded() -> None:
    src = SinusoidTasks(shots=5, query_shots=7)
    a = src.sample(50, generator=torch.Generator().manual_seed(3))
    b = src.sample(50, generator=torch.Generator().manual_seed(3))
    assert a.support_x.shape == (50, 5, 1) and a.query_x.shape == (50, 7, 1)
    assert_close(a.support_x, b.support_x)
    amp, phase = a.info["amplitude"], a.info["phase"]
    assert float(amp.min()) >= 0.1 and float(amp.max()) <= 5.0
    assert float(phase.min()) >= 0.0 and float(phase.max()) <= math.pi
    assert float(a.support_x.abs().max()) <= 5.0
    expected = amp[:, None, None] * torch.sin(a.query_x + phase[:, None, None])
    assert_close(a.query_y, expected)
    c = src.sample(50, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a.support_x, c.support_x)


def test_batch_errors_name_field_and_task() -> None:
    x, y = torch.randn(3, 4, 1), torch.randn(3, 4, 1)
    y[2, 1, 0] = float("nan")
    with pytest.raises(TaskDataError, match=r"support_y of task 2, point 1 is nan"):
        TaskBatch(x, y)
    with pytest.raises(TaskDataError, match="query_x is missing"):
        TaskBatch(x, torch.randn(3, 4, 1), query_y=torch.randn(3, 2, 1))
    with pytest.raises(TaskDataError, match="support_x has 4 points per task but support_y has 5"):
        TaskBatch(x, torch.randn(3, 5, 1))
    with pytest.raises(TaskDataError, match="query_x has 2 tasks and query_y has 3"):
        TaskBatch(x, torch.randn(3, 4, 1), torch.randn(2, 2, 1), torch.randn(3, 2, 1))
    q = torch.randn(3, 2, 1)
    q[0, 0, 0] = float("inf")
    with pytest.raises(TaskDataError, match="query_x of task 0, point 0 is inf"):
        TaskBatch(x, torch.randn(3, 4, 1), q, torch.randn(3, 2, 1))
    with pytest.raises(TaskDataError, match="needs a query set"):
        TaskBatch(x, torch.randn(3, 4, 1)).require_query("the MAML objective")


def test_collection_of_unequal_tasks_pads_and_masks() -> None:
    rng = np.random.default_rng(0)
    tasks = [
        (
            rng.standard_normal((n, 2)),
            rng.standard_normal((n, 1)),
            rng.standard_normal((m, 2)),
            rng.standard_normal((m, 1)),
        )
        for n, m in [(3, 4), (5, 2), (1, 3)]
    ]
    coll = TaskCollection(tasks)
    assert coll.is_ragged and len(coll) == 3
    batch = coll.batch()
    assert batch.support_x.shape == (3, 5, 2)
    assert batch.support_mask is not None and batch.support_mask.sum(1).tolist() == [3, 5, 1]
    assert batch.query_mask is not None and batch.query_mask.sum(1).tolist() == [4, 2, 3]
    assert_close(batch.support_x[0, :3], torch.as_tensor(tasks[0][0]))
    # padding repeats a real point, so it is finite and inside the data's domain
    assert_close(batch.support_x[2, 1:], batch.support_x[2, :1].expand(4, 2))
    sample = coll.sample(2, generator=torch.Generator().manual_seed(0))
    assert sample.num_tasks == 2 and sample.task_ids is not None


def test_collection_errors_name_the_task() -> None:
    good = (np.zeros((3, 1)), np.zeros((3, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    bad = (np.zeros((3, 1)), np.zeros((4, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(TaskDataError, match="task 1: support_x has 3 points but support_y has 4"):
        TaskCollection([good, bad])
    nan = (np.zeros((3, 1)), np.array([[0.0], [np.nan], [0.0]]), np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(TaskDataError, match="support_y of task 1, point 1 is nan"):
        TaskCollection([good, nan])
    with pytest.raises(TaskDataError, match="task 0 has no query set"):
        TaskCollection([good[:2]])
    wrong_dim = (np.zeros((3, 2)), np.zeros((3, 1)), np.zeros((2, 2)), np.zeros((2, 1)))
    with pytest.raises(TaskDataError, match="task 1: support_x points have shape"):
        TaskCollection([good, wrong_dim])


def test_from_tensors_and_device_moves() -> None:
    coll = TaskCollection.from_tensors(
        torch.randn(4, 3, 1), torch.randn(4, 3, 1), torch.randn(4, 2, 1), torch.randn(4, 2, 1)
    )
    batch = coll.batch([1, 3]).to("cpu", dtype=torch.float32)
    assert batch.support_x.dtype == torch.float32 and batch.task_ids.tolist() == [1, 3]
    assert not coll.is_ragged and coll.batch().support_mask is None


def test_episodic_sampler_makes_n_way_k_shot_episodes() -> None:
    images = torch.arange(60, dtype=torch.float64).reshape(60, 1) * 1.0
    labels = torch.arange(60) // 6  # 10 classes of 6 examples; class c holds values 6c..6c+5
    sampler = EpisodicSampler(images, labels, ways=3, shots=2, query_shots=3)
    batch = sampler.sample(8, generator=torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (8, 6, 1) and batch.query_y.shape == (8, 9)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    for t in range(8):
        classes = batch.info["classes"][t]
        assert len(set(classes.tolist())) == 3
        for label in range(3):
            cls = int(classes[label])
            xs = batch.support_x[t][batch.support_y[t] == label].flatten()
            xq = batch.query_x[t][batch.query_y[t] == label].flatten()
            # every example belongs to the episode's class, and support and query never overlap
            assert all(6 * cls <= v < 6 * cls + 6 for v in torch.cat([xs, xq]).tolist())
            assert not set(xs.tolist()) & set(xq.tolist())


def test_episodic_sampler_errors() -> None:
    with pytest.raises(TaskDataError, match="class 1 has 2 examples but an episode needs 3"):
        EpisodicSampler(
            torch.zeros(5, 1), torch.tensor([0, 0, 0, 1, 1]), ways=2, shots=1, query_shots=2
        )
    with pytest.raises(TaskDataError, match="labels must have shape"):
        EpisodicSampler(torch.zeros(5, 1), torch.tensor([0, 1]), ways=2, shots=1)


def test_collection_keeps_the_requested_precision() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 1))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        assert TaskCollection.from_tensors(x, x, x, x).batch().support_x.dtype == torch.float32
        exact = TaskCollection.from_tensors(x, x, x, x, dtype=torch.float64).batch().support_x
        assert exact.dtype == torch.float64 and torch.equal(exact, torch.as_tensor(x))
    finally:
        torch.set_default_dtype(previous)
