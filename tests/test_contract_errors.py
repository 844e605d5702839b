"""Contract errors a new user can act on: a missing tasks plate, data outside the likelihood's
support, and counts of tasks with NaN that count the tasks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor

from hierbayes.errors import ModelContractError, TaskDataError
from hierbayes.inference import fit
from hierbayes.models import NeuralRegression, model_structure
from hierbayes.tasks import EpisodicSampler, TaskBatch, TaskCollection
from tests.helpers import regression_batch, tiny_mlp

# -- a missing or misplaced tasks plate ------------------------------------------------------


def _readme_without_plates(x: Tensor, y: Tensor | None = None) -> None:
    """The README's model with both plates removed: it runs, and has no tasks plate."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
    mean = x[..., 0] * phi[..., 0] + phi[..., 1]
    pyro.sample("y", dist.Normal(mean, 0.5).to_event(2), obs=None if y is None else y[..., 0])


def _plate_named_task(x: Tensor, y: Tensor | None = None) -> None:
    """The README's model with its plate named "task" (and Pyro's default dims): it fails."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("task", x.shape[0]):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1]):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def _plate_named_task_at_dim_2(x: Tensor, y: Tensor | None = None) -> None:
    """A plate named "task" at the right dims: it runs, and has no tasks plate."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("task", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def _tasks_plate_at_dim_1(x: Tensor, y: Tensor | None = None) -> None:
    """The README's model with the tasks plate at dim=-1 and the data plate inside: it fails."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-1):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-2):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


@pytest.mark.parametrize(
    "model, opened, fails",
    [
        pytest.param(_readme_without_plates, "the program opened no plate", False, id="no plate"),
        pytest.param(
            _plate_named_task,
            "the program opened the plate(s) 'task' (size 4, dim=-1)"
            " (is 'task' meant to be it? its name must be exactly 'tasks')",
            True,
            id="plate named task, failing",
        ),
        pytest.param(
            _plate_named_task_at_dim_2,
            "the program opened the plate(s) 'task' (size 4, dim=-2), 'data' (size 6, dim=-1)"
            " (is 'task' meant to be it? its name must be exactly 'tasks')",
            False,
            id="plate named task",
        ),
    ],
)
def test_a_missing_tasks_plate_names_the_plates_and_shows_the_fix(
    model: Callable[..., None], opened: str, fails: bool
) -> None:
    batch = regression_batch(T=4, N=6)
    with pytest.raises(ModelContractError) as info:
        model_structure(model, batch.support_x, batch.support_y)
    message = str(info.value)
    assert message.startswith(f"the model has no pyro.plate('tasks', T): {opened}. "), message
    assert "hierbayes needs one plate named 'tasks'" in message
    assert (
        "    with pyro.plate('tasks', x.shape[0], dim=-2):\n"
        "        phi = pyro.sample('phi', dist.Normal(theta, 1.0).to_event(1))"
    ) in message
    assert "A hierbayes model is a Pyro program" in message
    assert "Trace Shapes" not in message and "tensor(" not in message
    if fails:  # Pyro's own error is the cause, not part of the message
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "must match the size" in str(info.value.__cause__)
    else:
        assert info.value.__cause__ is None


def test_a_tasks_plate_at_dim_1_that_breaks_the_shapes_says_where_the_plates_go() -> None:
    batch = regression_batch(T=4, N=6)
    with pytest.raises(ModelContractError) as info:
        model_structure(_tasks_plate_at_dim_1, batch.support_x, batch.support_y)
    message = str(info.value)
    assert "inside pyro.plate('tasks', 4, dim=-1)" in message, message
    assert "put pyro.plate('tasks', T, dim=-2) outside and pyro.plate('data', N, dim=-1)" in message
    assert "Trace Shapes" not in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_model_that_crashes_before_any_plate_keeps_its_own_error() -> None:
    def crashes(x: Tensor, y: Tensor | None = None) -> None:
        raise KeyError("weights")

    batch = regression_batch()
    with pytest.raises(ModelContractError, match=r"failed: KeyError: 'weights'") as info:
        model_structure(crashes, batch.support_x, batch.support_y)
    assert isinstance(info.value.__cause__, KeyError)


# -- data outside the likelihood's support ---------------------------------------------------


def _program(make: Callable[[Tensor], Any], labels: bool = False) -> Callable[..., None]:
    """A plain program over x ``(T, N, 1)``: theta, phi in the tasks plate, ``make(f)`` the
    observation distribution of the outputs ``f`` ``(T, N)`` (``(T, N, 3)`` logits when
    ``labels``)."""

    def model(x: Tensor, y: Tensor | None = None) -> None:
        D = 3 if labels else 1
        theta = pyro.sample("theta", dist.Normal(torch.zeros(D), 10.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            f = x * phi if labels else x[..., 0] * phi[..., 0]
            obs = None if y is None else (y if labels else y[..., 0])
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("y", make(f), obs=obs)

    return model


def _batch(labels: bool = False, T: int = 8, N: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(T, N, 1, generator=g), torch.randn(T, N, 1, generator=g)
    if labels:
        return TaskBatch(
            x, torch.zeros(T, N, dtype=torch.long), xq, torch.ones(T, N, dtype=torch.long)
        )
    return TaskBatch(x, torch.ones(T, N, 1), xq, torch.ones(T, N, 1))


@pytest.mark.parametrize(
    "name, make, field, value, shown, support",
    [
        pytest.param(
            "binomial",
            lambda f: dist.Binomial(5, logits=f),
            "support_y",
            7.0,
            "7",
            "Binomial with total_count 5: integers 0..5",
            id="binomial above total_count",
        ),
        pytest.param(
            "bernoulli",
            lambda f: dist.Bernoulli(logits=f),
            "query_y",
            2.0,
            "2",
            "Bernoulli: 0 or 1",
            id="bernoulli 2",
        ),
        pytest.param(
            "poisson",
            lambda f: dist.Poisson(f.exp()),
            "support_y",
            -1.0,
            "-1",
            "Poisson: integers 0, 1, 2, ...",
            id="poisson negative",
        ),
        pytest.param(
            "categorical",
            lambda f: dist.Categorical(logits=f),
            "query_y",
            3,
            "3",
            "Categorical over 3 classes: integers 0..2",
            id="categorical label out of range",
        ),
    ],
)
def test_data_outside_the_support_names_field_task_point_value_and_support(
    name: str, make: Callable[[Tensor], Any], field: str, value: float, shown: str, support: str
) -> None:
    labels = name == "categorical"
    batch = _batch(labels)
    target = getattr(batch, field).clone()
    target[3, 1] = value
    batch = TaskBatch(**{**_fields(batch), field: target})
    with pytest.raises(TaskDataError) as info:
        fit(_program(make, labels), batch, meta_steps=1, meta_batch_size=8, progress=False)
    message = str(info.value)
    expected = (
        f"{field} of task 3, point 1 is {shown}, outside the support of the observed site 'y' "
        f"({support})"
    )
    assert expected in message, message
    assert "tensor(" not in message and "Expected value argument" not in message


def _fields(batch: TaskBatch) -> dict[str, Tensor]:
    return {
        "support_x": batch.support_x,
        "support_y": batch.support_y,
        "query_x": batch.query_x,  # type: ignore[dict-item]
        "query_y": batch.query_y,  # type: ignore[dict-item]
    }


def test_data_in_the_support_trains() -> None:
    result = fit(
        _program(lambda f: dist.Binomial(5, logits=f)),
        _batch(),
        meta_steps=2,
        meta_batch_size=8,
        progress=False,
    )
    assert all(math.isfinite(v) for v in result.history)


@pytest.mark.parametrize("field", ["support_y", "query_y"])
def test_data_outside_the_support_after_training_is_named_by_adapt_and_evaluate(field: str) -> None:
    """The sibling entry points: a trained result adapting to, or evaluating on, new tasks
    whose targets leave the likelihood's support names them as fit does."""
    result = fit(
        _program(lambda f: dist.Binomial(5, logits=f)),
        _batch(),
        meta_steps=2,
        meta_batch_size=8,
        progress=False,
    )
    batch = _batch()
    target = getattr(batch, field).clone()
    target[2, 3] = 9.0
    new = TaskBatch(**{**_fields(batch), field: target})
    with pytest.raises(TaskDataError) as info:
        result.evaluate(new)
    message = str(info.value)
    assert f"{field} of task 2, point 3 is 9, outside the support" in message, message
    assert "tensor(" not in message


# -- NaN counts ------------------------------------------------------------------------------


def test_a_list_of_8_tasks_of_which_3_hold_nan_counts_3_of_8() -> None:
    batch = regression_batch(T=8)
    tasks = [
        (batch.support_x[j], batch.support_y[j].clone(), batch.query_x[j], batch.query_y[j])  # type: ignore[index]
        for j in range(8)
    ]
    for j, field in ((2, 1), (5, 1), (6, 3)):
        tasks[j][field][1, 0] = math.nan
    with pytest.raises(TaskDataError) as info:
        TaskCollection(tasks)
    message = str(info.value)
    assert message.startswith("support_y of task 2, point 1 is nan: every value must be finite")
    assert "(3 task(s) of 8 hold NaN or inf: tasks 2, 5, 6)" in message, message
    with pytest.raises(TaskDataError, match=r"\(3 task\(s\) of 8 hold NaN or inf"):
        fit(NeuralRegression(tiny_mlp(3)), tasks, meta_steps=1, progress=False)


def test_nan_inputs_of_an_episodic_sampler_name_the_input_not_a_task() -> None:
    inputs = torch.randn(12, 2)
    inputs[4, 1] = math.nan
    inputs[9, 0] = math.inf
    labels = torch.arange(12) % 3
    with pytest.raises(TaskDataError) as info:
        EpisodicSampler(inputs, labels, ways=2, shots=1, query_shots=1)
    message = str(info.value)
    assert message.startswith("inputs[4] holds nan: every input must be finite"), message
    assert "(2 of 12 inputs hold NaN or inf)" in message and "task" not in message
