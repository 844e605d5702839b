"""The model contract: structure discovery, clear errors, native densities against Pyro's."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hierbayes.errors import ModelContractError, TaskDataError
from hierbayes.inference import fit
from hierbayes.models import (
    BayesianLinearRegression,
    CategoricalLikelihood,
    NeuralRegression,
    PyroTaskDensity,
    TaskModel,
    model_structure,
    task_density,
)
from hierbayes.tasks import TaskBatch, TaskCollection
from tests.helpers import regression_batch, tiny_mlp


def classification_batch(T: int = 3, N: int = 6, C: int = 3) -> TaskBatch:
    x = torch.randn(T, N, 2)
    y = torch.randint(0, C, (T, N))
    return TaskBatch(x, y, torch.randn(T, 4, 2), torch.randint(0, C, (T, 4)))


MODELS: dict[str, Callable[[], tuple[object, TaskBatch]]] = {
    "linear": lambda: (
        BayesianLinearRegression(3, bias=True, learn_noise=True, learn_prior_scale=True),
        regression_batch(d=3),
    ),
    "neural": lambda: (NeuralRegression(tiny_mlp(6)), regression_batch()),
    "per-task-noise": lambda: (
        NeuralRegression(tiny_mlp(6), per_task_noise=True, learn_prior_scale=True),
        regression_batch(),
    ),
    "categorical": lambda: (
        TaskModel(
            nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3)),
            CategoricalLikelihood(),
            prior_scale=0.5,
        ),
        classification_batch(),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_density_equals_pyro_trace(name: str) -> None:
    model, batch = MODELS[name]()
    structure = model_structure(model, batch.support_x, batch.support_y)
    native, generic = task_density(model, structure), PyroTaskDensity(model, structure)
    assert type(native) is not PyroTaskDensity
    params = dict(model.initial_values())
    if "noise_scale" in params:
        params["noise_scale"] = torch.tensor(0.7)
    T, D = batch.num_tasks, structure.num_params
    phi = params["theta"] + 0.3 * torch.randn(T, D)
    x, y = batch.support_x, batch.support_y
    mask = torch.rand(x.shape[:2]) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        assert_close(
            native.log_likelihood(params, phi, x, y, m),
            generic.log_likelihood(params, phi, x, y, m),
        )
    assert_close(native.log_prior(params, phi, x), generic.log_prior(params, phi, x))
    assert_close(native.prior_mean(params, x), generic.prior_mean(params, x))
    assert_close(native.log_hyperprior(params, x), generic.log_hyperprior(params, x))
    p_native, p_generic = native.predictive(params, phi, x), generic.predictive(params, phi, x)
    assert_close(p_native.log_prob(y), p_generic.log_prob(y))


def test_structure_of_the_built_in_model() -> None:
    model, batch = MODELS["linear"]()
    s = model_structure(model, batch.support_x, batch.support_y)
    assert s.task_site == "phi" and s.observed_sites == ("y",)
    assert [g.name for g in s.global_sites] == ["theta", "noise_scale", "prior_scale"]
    assert s.num_params == 4 and s.tasks_dim == -2 and s.data_dims == {"y": -1}
    phi = torch.randn(batch.num_tasks, 4)
    assert s.to_site(phi).shape == (batch.num_tasks, 1, 4)
    assert_close(s.from_site(s.to_site(phi)), phi)


def _no_plate(x, y=None):  # type: ignore[no-untyped-def]
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(theta, 1.0).expand(y.shape).to_event(y.dim()), obs=y)


def _no_task_latent(x, y=None):  # type: ignore[no-untyped-def]
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
    with pyro.plate("tasks", x.shape[0], dim=-2), pyro.plate("data", x.shape[1], dim=-1):
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y[..., 0])


def _two_task_latents(x, y=None):  # type: ignore[no-untyped-def]
    with pyro.plate("tasks", x.shape[0], dim=-2):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(a + b * x[..., 0], 1.0), obs=y[..., 0])


def _positive_task_latent(x, y=None):  # type: ignore[no-untyped-def]
    with pyro.plate("tasks", x.shape[0], dim=-2):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(0.0, s), obs=y[..., 0])


def _observation_outside(x, y=None):  # type: ignore[no-untyped-def]
    with pyro.plate("tasks", x.shape[0], dim=-2):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(a.sum(), 1.0), obs=y.sum())


@pytest.mark.parametrize(
    "model, message",
    [
        (_no_plate, "has no pyro.plate\\('tasks', T\\)"),
        (_no_task_latent, "no per-task latent"),
        (_two_task_latents, "2 per-task latents \\['a', 'b'\\].*Concatenate"),
        (_positive_task_latent, "gradient steps need a real-valued latent"),
        (_observation_outside, "observed site 'y' is outside pyro.plate\\('tasks'\\)"),
    ],
)
def test_contract_violations_are_explained(model: Callable[..., object], message: str) -> None:
    batch = regression_batch()
    with pytest.raises(ModelContractError, match=message) as info:
        model_structure(model, batch.support_x, batch.support_y)
    assert "A hierbayes model is a Pyro program" in str(info.value) or "real-valued" in str(
        info.value
    )


def _user_model(x, y=None):  # type: ignore[no-untyped-def]
    """A plain Pyro program: linear regression with theta a pyro.param and a fixed noise."""
    theta = pyro.param("user_theta", torch.zeros(2))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = (x * phi[..., :1]).sum(-1) + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def test_a_plain_pyro_program_meta_trains_through_the_generic_path() -> None:
    g = torch.Generator().manual_seed(1)
    J, N, M = 40, 5, 5
    true_theta = torch.tensor([1.5, -1.0])
    phi = true_theta + 0.3 * torch.randn(J, 2, generator=g)
    x = torch.randn(J, N + M, 1, generator=g)
    y = x * phi[:, None, :1] + phi[:, None, 1:] + 0.5 * torch.randn(J, N + M, 1, generator=g)
    tasks = TaskCollection.from_tensors(x[:, :N], y[:, :N], x[:, N:], y[:, N:])
    result = fit(
        _user_model,
        tasks,
        meta_steps=300,
        meta_batch_size=J,
        lr=0.05,
        step_size=0.05,
        progress=False,
    )
    assert type(result.guide.density) is PyroTaskDensity
    assert result.guide.structure.param_sites == ("user_theta",)
    learned = pyro.param("user_theta").detach()
    assert float((learned - true_theta).norm()) < 0.3
    assert result.history[-1] < result.history[0]


def _points_then_tasks(x, y=None):  # type: ignore[no-untyped-def]
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-1):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = (x[..., 0] * phi[:, None, 0] + phi[:, None, 1]).T
        with pyro.plate("data", x.shape[1], dim=-2):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0].T)


def _no_global(x, y=None):  # type: ignore[no-untyped-def]
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            mean = x[..., 0] * phi[..., 0] + phi[..., 1]
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def test_contract_gaps_are_named_before_training() -> None:
    """repro_10: each gap gets an error that names the problem and the fix."""
    from hierbayes.inference import fit
    from hierbayes.models import NeuralRegression

    b = TaskBatch(
        torch.randn(6, 5, 1), torch.randn(6, 5, 1), torch.randn(6, 7, 1), torch.randn(6, 7, 1)
    )
    with pytest.raises(ModelContractError, match=r"laid out \(points, tasks\).*dim=-2"):
        model_structure(_points_then_tasks, b.support_x, b.support_y)
    with pytest.raises(ModelContractError, match="nothing for meta-training to learn"):
        fit(_no_global, b, meta_steps=2, progress=False)
    with pytest.raises(ModelContractError, match="fit needs a model"):
        fit(None, b, meta_steps=2, progress=False)
    result = fit(NeuralRegression(), b, meta_steps=2, progress=False)
    with pytest.raises(TaskDataError, match=r"x has shape \(6, 5, 3\).*each point of shape \(1,\)"):
        result.predict(b, torch.randn(6, 5, 3))
