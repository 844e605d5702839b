"""Regression tests for problems a review found: plain Pyro programs under handlers, batch norm
with masks, target shapes, dtypes, pyro.param models, divergence, and bad inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from torch import nn
from torch.testing import assert_close

from hierbayes.errors import ModelContractError, TaskDataError
from hierbayes.inference import MAMLObjective, MetaTrainingDiverged, TruncatedGradientGuide, fit
from hierbayes.inference.references import meanfield_vi
from hierbayes.inference.training.boundary import warn_if_prior_collapsed
from hierbayes.models import GaussianLikelihood, NeuralRegression, TaskModel
from hierbayes.tasks import EpisodicSampler, SinusoidTasks, TaskBatch, TaskCollection
from tests.helpers import regression_batch, tiny_mlp


def plain_model(x, y=None):  # type: ignore[no-untyped-def]
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(2), 10.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def param_model(x, y=None):  # type: ignore[no-untyped-def]
    theta = pyro.param("theta", x.new_zeros(2))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def test_a_plain_program_works_under_trace_svi_and_meanfield_vi() -> None:
    batch = regression_batch(T=4, N=5)
    guide = TruncatedGradientGuide(plain_model, batch, step_size=0.01)
    trace = poutine.trace(guide).get_trace(batch.support_x, batch.support_y)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == ["theta", "tasks", "phi"]
    svi = SVI(plain_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=MAMLObjective())
    losses = [svi.step(batch) for _ in range(20)]
    assert losses[-1] < losses[0]
    posterior = meanfield_vi(plain_model, guide.global_values(), batch, num_steps=30)
    assert posterior.mean.shape == (4, 2)


def test_llama_on_a_plain_program_trains_and_predicts_by_sampling() -> None:
    source = SinusoidTasks(shots=5, query_shots=5)
    result = fit(
        plain_model,
        source,
        method="llama",
        objective="evidence",
        curvature="full",
        meta_steps=5,
        meta_batch_size=4,
        step_size=0.01,
        progress=False,
    )
    batch = source.sample(3, generator=torch.Generator().manual_seed(0))
    metrics = result.evaluate(batch)
    assert bool(torch.isfinite(metrics.nll).all())
    with pytest.raises(ModelContractError, match="method='sampled'"):
        result.adapt(batch).predict(batch.query_x, method="linearized")
    # the predictive objective takes a plain program too: draws of phi through its own site
    predictive = fit(
        plain_model,
        source,
        method="llama",
        objective="predictive",
        meta_steps=2,
        meta_batch_size=4,
        step_size=0.01,
        progress=False,
    )
    assert predictive.objective.approximation(predictive.guide.density) == "sampled"  # type: ignore[attr-defined]
    assert all(math.isfinite(v) for v in predictive.history)


def test_batch_norm_refuses_masked_tasks() -> None:
    net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    g = torch.Generator().manual_seed(0)
    tasks = [
        (
            torch.randn(n, 1, generator=g),
            torch.randn(n, 1, generator=g),
            torch.randn(3, 1, generator=g),
            torch.randn(3, 1, generator=g),
        )
        for n in (3, 5)
    ]
    with pytest.raises(TaskDataError, match="batch norm"):
        fit(
            NeuralRegression(net),
            TaskCollection(tasks),
            meta_steps=2,
            meta_batch_size=2,
            progress=False,
        )


def test_targets_of_the_wrong_shape_are_refused_by_field() -> None:
    batch = regression_batch(T=4, N=4, M=3)
    flat = TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y)
    with pytest.raises(
        TaskDataError, match=r"support_y \(shape \(4, 4\)\) does not fit the model.*unsqueeze"
    ):
        fit(NeuralRegression(tiny_mlp(3)), flat, progress=False)
    flat_query = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y[..., 0])
    with pytest.raises(TaskDataError, match=r"query_y \(shape \(4, 3\)\) does not fit"):
        fit(NeuralRegression(tiny_mlp(3)), flat_query, progress=False)


def test_dtype_is_honoured_by_predict_and_evaluate_and_mismatches_are_explained() -> None:
    torch.set_default_dtype(torch.float32)
    source = SinusoidTasks(shots=5, query_shots=5)
    result = fit(
        NeuralRegression(tiny_mlp(4)),
        source,
        meta_steps=3,
        meta_batch_size=4,
        step_size=0.05,
        progress=False,
        dtype=torch.float64,
    )
    batch = source.sample(3)  # float32 data
    assert batch.query_x.dtype == torch.float32
    assert result.predict(batch).mean.dtype == torch.float64
    assert result.evaluate(batch).nll.dtype == torch.float64
    with pytest.raises(TaskDataError, match=r"pass dtype=torch\.float64 to fit"):
        fit(
            NeuralRegression(tiny_mlp(4)),
            batch.to(dtype=torch.float64),
            meta_steps=1,
            progress=False,
        )


def test_paper_loss_with_per_task_noise() -> None:
    result = fit(
        NeuralRegression(tiny_mlp(4), per_task_noise=True),
        SinusoidTasks(shots=5, query_shots=5),
        method="llama",
        objective="paper",
        curvature="ggn",
        meta_steps=3,
        meta_batch_size=3,
        step_size=0.05,
        progress=False,
    )
    assert all(np.isfinite(result.history))


def test_param_models_are_reproducible_and_report_their_params() -> None:
    tasks = regression_batch(T=6, N=5)
    a = fit(
        param_model,
        tasks,
        meta_steps=15,
        meta_batch_size=3,
        step_size=0.05,
        lr=0.05,
        progress=False,
        seed=1,
    )
    assert "theta" in a.params and a.params["theta"].shape == (2,)
    assert_close(a.theta, pyro.param("theta").detach())
    b = fit(
        param_model,
        tasks,
        meta_steps=15,
        meta_batch_size=3,
        step_size=0.05,
        lr=0.05,
        progress=False,
        seed=1,
    )
    assert a.history == b.history


def test_non_finite_gradients_stop_training_before_the_step() -> None:
    class Poisoned:
        """Sinusoid tasks, then from the fourth training draw (the first draw builds the guide)
        one target so large that the loss overflows."""

        num_tasks = None

        def __init__(self) -> None:
            self.calls = 0
            self.inner = SinusoidTasks(shots=5, query_shots=5)

        def sample(self, num_tasks, *, generator=None, dtype=None):  # type: ignore[no-untyped-def]
            self.calls += 1
            batch = self.inner.sample(num_tasks, generator=generator, dtype=dtype)
            if self.calls > 4:
                batch.query_y[0, 0, 0] = 1e200
            return batch

    with pytest.raises(MetaTrainingDiverged, match="meta-step 3") as info:
        fit(
            NeuralRegression(tiny_mlp(4)),
            Poisoned(),
            meta_steps=10,
            meta_batch_size=4,
            step_size=0.05,
            progress=False,
        )
    result = info.value.result
    assert len(result.history) == 3 and all(np.isfinite(result.history))
    assert bool(torch.isfinite(result.theta).all())


def test_prior_scale_collapse_is_reported() -> None:
    model = TaskModel(tiny_mlp(3), GaussianLikelihood(), prior_scale=0.1, learn_prior_scale=True)
    result = fit(
        model, regression_batch(), method="llama", meta_steps=1, step_size=0.05, progress=False
    )
    with torch.no_grad():
        result.guide.locs.prior_scale_unconstrained.fill_(float(np.log(1e-5)))
    with pytest.warns(UserWarning, match="learned prior scale fell from 0.1"):
        warn_if_prior_collapsed(model, result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            result.guide.locs.prior_scale_unconstrained.fill_(float(np.log(0.05)))
        warn_if_prior_collapsed(model, result)


def test_bad_collections_and_integer_images() -> None:
    empty_query = (np.zeros((3, 1)), np.zeros((3, 1)), np.zeros((0, 1)), np.zeros((0, 1)))
    good = (np.zeros((3, 1)), np.zeros((3, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(TaskDataError, match="task 1 has an empty query set"):
        TaskCollection([good, empty_query])
    images = torch.randint(0, 255, (12, 1, 2, 2), dtype=torch.uint8)
    sampler = EpisodicSampler(images, torch.arange(12) // 4, ways=2, shots=1, query_shots=1)
    assert torch.is_floating_point(sampler.sample(2).support_x)


def test_heavy_tailed_globals_start_at_a_median_not_a_huge_mean() -> None:
    from hierbayes.models import model_structure

    def model(x, y=None):  # type: ignore[no-untyped-def]
        s = pyro.sample("s", dist.LogNormal(0.0, 10.0))  # mean e^50
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(0.0, s).expand([2]).to_event(1))
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(x[..., 0] * phi[..., 0], 1.0), obs=y[..., 0])

    batch = regression_batch()
    (site,) = model_structure(model, batch.support_x, batch.support_y).global_sites
    assert 0 < float(site.prior_mean) < 1e6
