"""fit(): results, adaptation, reproducibility, devices, masks and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hierbayes.errors import TaskDataError
from hierbayes.inference import FitResult, MAMLObjective, MetaTrainingDiverged, fit
from hierbayes.inference.diagnostics import mean_ci95
from hierbayes.inference.posteriors import GaussianPrediction, PointMassPosterior
from hierbayes.models import BayesianLinearRegression, NeuralRegression
from hierbayes.tasks import SinusoidTasks, TaskBatch, TaskCollection
from tests.helpers import regression_batch, tiny_mlp


def small_fit(**kwargs: object) -> FitResult:
    options: dict[str, object] = dict(
        meta_steps=20, meta_batch_size=4, step_size=0.05, progress=False
    )
    options.update(kwargs)
    return fit(NeuralRegression(tiny_mlp(5)), SinusoidTasks(shots=5, query_shots=5), **options)  # type: ignore[arg-type]


def test_fit_returns_a_result_that_adapts_and_predicts() -> None:
    result = small_fit()
    assert len(result.history) == 20 and result.method == "maml"
    assert set(result.params) == {"theta", "noise_scale"}
    batch = SinusoidTasks(shots=5, query_shots=7).sample(
        3, generator=torch.Generator().manual_seed(9)
    )
    posterior = result.adapt(batch)
    assert isinstance(posterior, PointMassPosterior) and posterior.mean.shape == (
        3,
        result.theta.numel(),
    )
    prediction = result.predict(batch)
    assert isinstance(prediction, GaussianPrediction) and prediction.mean.shape == (3, 7, 1)
    assert_close(prediction.variance, result.params["noise_scale"].square().expand(3, 7, 1))
    # adaptation moves every task away from theta; zero inner steps does not
    assert (posterior.mean - result.theta).abs().amax(1).min() > 0
    assert_close(result.adapt(batch, inner_steps=0).mean, result.theta.expand(3, -1))
    assert result.guide.inner_steps == 1
    metrics = result.evaluate(batch)
    assert (
        metrics.mse is not None
        and metrics.mse.shape == (3,)
        and set(metrics.coverage) == {0.5, 0.9}
    )


def test_fit_is_reproducible_with_a_seed() -> None:
    a, b, c = small_fit(seed=3), small_fit(seed=3), small_fit(seed=4)
    assert a.history == b.history
    assert a.history != c.history


def test_divergence_at_the_first_step_leaves_the_initial_state() -> None:
    """(Divergence after some finite steps: test_review_fixes.py.)"""
    batch = regression_batch(d=1)
    model = BayesianLinearRegression(1, bias=True)
    # 1 - alpha * lambda is far below -1, so the inner iterates grow geometrically to infinity
    with pytest.raises(
        MetaTrainingDiverged, match=r"meta-step 0: .*Lower step_size.*No step was taken"
    ) as info:
        fit(model, batch, step_size=10.0, inner_steps=300, meta_steps=5, progress=False)
    result = info.value.result
    assert result.history == []
    assert_close(result.theta, model.theta_init)  # no step was taken


def test_bad_task_data_is_refused_before_training() -> None:
    batch = regression_batch()
    x = batch.query_x.clone()
    x[1, 2, 0] = float("nan")
    with pytest.raises(TaskDataError, match="query_x of task 1, point 2 is nan"):
        fit(
            NeuralRegression(tiny_mlp(3)),
            TaskBatch(batch.support_x, batch.support_y, x, batch.query_y),
            progress=False,
        )
    with pytest.raises(TaskDataError, match="meta-training needs a query set"):
        fit(
            NeuralRegression(tiny_mlp(3)),
            TaskBatch(batch.support_x, batch.support_y),
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown method 'reptile'"):
        fit(NeuralRegression(tiny_mlp(3)), batch, method="reptile", progress=False)


def test_cuda_request_without_cuda_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA exists here")
    with pytest.raises(RuntimeError, match="cuda"):
        small_fit(device="cuda")


@pytest.mark.gpu
def test_fit_on_cuda_matches_cpu() -> None:
    cpu = small_fit(seed=1, meta_steps=5)
    gpu = small_fit(seed=1, meta_steps=5, device="cuda")
    assert gpu.theta.device.type == "cuda"
    assert_close(torch.tensor(gpu.history), torch.tensor(cpu.history), rtol=1e-6, atol=1e-8)
    batch = SinusoidTasks(shots=5, query_shots=5).sample(
        4, generator=torch.Generator().manual_seed(0)
    )
    assert gpu.predict(batch).mean.device.type == "cuda"


def test_unequal_task_sizes_are_masked_exactly() -> None:
    """The masked batch loss equals the average of each task's loss computed alone."""
    g = torch.Generator().manual_seed(0)
    sizes = [(3, 4), (6, 2), (4, 5)]
    tasks = [
        (
            torch.randn(n, 2, generator=g),
            torch.randn(n, 1, generator=g),
            torch.randn(m, 2, generator=g),
            torch.randn(m, 1, generator=g),
        )
        for n, m in sizes
    ]
    collection = TaskCollection(tasks)
    model = BayesianLinearRegression(2, bias=True, learn_noise=True)
    result = fit(model, collection, meta_steps=3, meta_batch_size=3, step_size=0.05, progress=False)
    objective = MAMLObjective()
    batch = collection.batch()
    assert batch.support_mask is not None
    together = objective.differentiable_loss(model, result.guide, batch)
    alone = [
        objective.differentiable_loss(
            model, result.guide, TaskBatch(*(t.unsqueeze(0) for t in task))
        )
        for task in tasks
    ]
    assert_close(together, torch.stack(alone).mean())


def test_short_demo_run_beats_no_adaptation() -> None:
    """The demo configuration (10-shot sinusoid, one inner step of MAML's 0.01 on the MSE)
    meta-trained briefly already beats predicting at theta, task by task."""
    result = fit(
        NeuralRegression(),
        SinusoidTasks(shots=10, query_shots=10),
        meta_steps=1500,
        step_size=2 * 0.01 / 10,
        seed=0,
        progress=False,
        dtype=torch.float32,
    )
    test = SinusoidTasks(shots=10, query_shots=10).sample(
        300, generator=torch.Generator().manual_seed(5)
    )
    adapted = result.evaluate(test.to(dtype=torch.float32))
    unadapted = result.evaluate(test.to(dtype=torch.float32), inner_steps=0)
    assert adapted.mse is not None and unadapted.mse is not None
    diff = mean_ci95(adapted.mse - unadapted.mse)
    assert diff["mean"] + diff["ci95"] < 0, diff


def test_gradient_checkpointing_trains_exactly_as_the_plain_inner_loop() -> None:
    """fit(gradient_checkpointing=True) recomputes the inner steps in the backward pass: the
    same second-order meta-gradients, so the same run."""
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        result = fit(
            NeuralRegression(tiny_mlp(5)),
            SinusoidTasks(shots=5, query_shots=5),
            meta_steps=4,
            meta_batch_size=3,
            inner_steps=2,
            step_size=0.01,
            gradient_checkpointing=checkpointing,
            progress=False,
        )
        runs.append(result)
    assert runs[1].guide.gradient_checkpointing and not runs[0].guide.gradient_checkpointing
    torch.testing.assert_close(torch.tensor(runs[0].history), torch.tensor(runs[1].history))
    for name, value in runs[0].params.items():
        torch.testing.assert_close(value, runs[1].params[name])
