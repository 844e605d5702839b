"""Nothing lost: save and load, checkpoint and resume, Ctrl-C, and training control."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

import hierbayes
from hierbayes.inference import (
    CheckpointError,
    MetaTrainingInterrupted,
    fit,
)
from hierbayes.inference.training.guards import boundary_warnings
from hierbayes.models import (
    BayesianLinearRegression,
    GaussianLikelihood,
    NeuralRegression,
    TaskModel,
    model_structure,
)
from hierbayes.tasks import SinusoidTasks, TaskBatch
from tests.helpers import regression_batch, tiny_mlp


def small_net_model() -> NeuralRegression:
    return NeuralRegression(tiny_mlp(6))


def sinusoid() -> SinusoidTasks:
    return SinusoidTasks(shots=5, query_shots=5)


def param_model(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.param("theta", x.new_zeros(2))
    scale = pyro.param("scale", x.new_ones(()), constraint=dist.constraints.positive)
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, scale).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def test_a_saved_builtin_result_loads_with_weights_only_and_predicts_bit_for_bit(
    tmp_path: Path,
) -> None:
    model = NeuralRegression(learn_prior_scale=True)
    result = fit(model, sinusoid(), meta_steps=4, meta_batch_size=3, progress=False)
    path = result.save(tmp_path / "run.pt")
    raw = torch.load(path, weights_only=True)  # no arbitrary pickles in the file
    assert raw["format"] == "hierbayes-fit"
    loaded = hierbayes.load(path)  # a built-in model is rebuilt from the file
    batch = sinusoid().sample(5, generator=torch.Generator().manual_seed(3))
    a, b = result.predict(batch), loaded.predict(batch)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    assert loaded.history == result.history
    for name, value in result.params.items():
        assert torch.equal(loaded.params[name], value), name


def test_a_function_model_needs_to_be_passed_back_in(tmp_path: Path) -> None:
    batch = regression_batch(T=4)
    result = fit(param_model, batch, meta_steps=5, lr=0.05, progress=False)
    path = result.save(tmp_path / "run.pt")
    trained = pyro.param("theta").detach().clone()
    with pytest.raises(CheckpointError, match=r"hierbayes.load\(.*model=model\)"):
        hierbayes.load(path)
    pyro.clear_param_store()
    loaded = hierbayes.load(path, model=param_model)
    assert torch.equal(pyro.param("theta").detach(), trained)
    assert_close(loaded.adapt(batch).mean, result.adapt(batch).mean, rtol=0, atol=0)


def test_a_custom_network_model_is_rebuilt_by_its_author(tmp_path: Path) -> None:
    model = TaskModel(tiny_mlp(3), GaussianLikelihood())
    result = fit(model, regression_batch(), meta_steps=2, progress=False)
    path = result.save(tmp_path / "run.pt")
    with pytest.raises(CheckpointError, match="pass it in"):
        hierbayes.load(path)
    loaded = hierbayes.load(path, model=TaskModel(tiny_mlp(3, seed=1), GaussianLikelihood()))
    assert torch.equal(loaded.theta, result.theta)


@pytest.mark.parametrize("method", ["maml", "llama"])
def test_half_plus_resume_plus_half_equals_a_straight_run(tmp_path: Path, method: str) -> None:
    options = dict(method=method, meta_batch_size=4, step_size=0.02, progress=False)
    straight = fit(small_net_model(), sinusoid(), meta_steps=8, **options)
    path = tmp_path / "ckpt.pt"
    first = fit(small_net_model(), sinusoid(), meta_steps=4, checkpoint=path, **options)
    first_theta = first.theta.clone()
    resumed = fit(small_net_model(), sinusoid(), meta_steps=8, resume=path, **options)
    assert torch.equal(resumed.theta, straight.theta)
    for name, value in straight.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert resumed.history == straight.history
    assert torch.equal(first.theta, first_theta)  # the old result is untouched


def test_checkpoints_are_written_every_n_steps_and_a_lr_schedule_resumes(tmp_path: Path) -> None:
    def schedule(optim: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)

    options = dict(meta_batch_size=3, lr_scheduler=schedule, progress=False)
    straight = fit(small_net_model(), sinusoid(), meta_steps=6, **options)
    path = tmp_path / "ckpt.pt"
    seen: list[int] = []
    fit(
        small_net_model(),
        sinusoid(),
        meta_steps=3,
        checkpoint=path,
        checkpoint_every=1,
        callback=lambda step, loss, res: (
            seen.append(len(torch.load(path, weights_only=True)["history"]))
            if path.exists()
            else None
        ),
        **options,
    )
    # written after each step, before its callback (the last by the end of the run)
    assert seen == [1, 2, 2]
    resumed = fit(small_net_model(), sinusoid(), meta_steps=6, resume=path, **options)
    assert torch.equal(resumed.theta, straight.theta)


def test_a_mismatched_or_corrupt_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    fit(
        small_net_model(),
        sinusoid(),
        meta_steps=2,
        meta_batch_size=3,
        checkpoint=path,
        progress=False,
    )
    with pytest.raises(CheckpointError, match="inner_steps: saved 1, now 2"):
        fit(
            small_net_model(),
            sinusoid(),
            meta_steps=4,
            meta_batch_size=3,
            inner_steps=2,
            resume=path,
            progress=False,
        )
    with pytest.raises(CheckpointError, match="global sites"):
        fit(
            NeuralRegression(tiny_mlp(6), learn_noise=False),
            sinusoid(),
            meta_steps=4,
            meta_batch_size=3,
            resume=path,
            progress=False,
        )
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        hierbayes.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a hierbayes run"):
        hierbayes.load(foreign)
    with pytest.raises(CheckpointError, match="no saved run"):
        hierbayes.load(tmp_path / "missing.pt")


def test_ctrl_c_keeps_the_partial_result_and_writes_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"

    def interrupt(step: int, loss: float, result: object) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(MetaTrainingInterrupted) as caught:
            fit(
                small_net_model(),
                sinusoid(),
                meta_steps=50,
                meta_batch_size=3,
                checkpoint=path,
                callback=interrupt,
                progress=False,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert len(caught.value.result.history) == 3
    assert len(torch.load(path, weights_only=True)["history"]) == 3


def test_injected_optimizer_clipping_and_metrics_log(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    result = fit(
        small_net_model(),
        sinusoid(),
        meta_steps=3,
        meta_batch_size=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
        clip_grad_norm=0.1,
        metrics_log=log,
        progress=False,
    )
    assert isinstance(result.training.optimizer, torch.optim.SGD)  # type: ignore[union-attr]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["grad_norm"] is not None and r["lr"] == 1e-3 for r in rows)


def test_a_diverging_inner_loop_is_an_error_not_a_silent_garbage_fit() -> None:
    with pytest.raises(hierbayes.inference.MetaTrainingDiverged, match="inner loop diverged"):
        fit(
            NeuralRegression(),
            SinusoidTasks(shots=10, query_shots=10),
            step_size=1e3,
            meta_steps=5,
            progress=False,
        )


def test_a_too_large_step_warns_once_with_a_count() -> None:
    model = BayesianLinearRegression(1, noise_scale=0.1)
    batch = regression_batch(T=6, N=8)
    with pytest.warns(UserWarning, match="raised the support loss") as record:
        fit(model, batch, step_size=0.04, meta_steps=6, check_every=1, progress=False)
    messages = [str(w.message) for w in record if "support loss" in str(w.message)]
    # issued when it first happens, then once more at the end with how often it fired
    assert len(messages) == 2
    assert "times in this run" not in messages[0] and "[6 times in this run" in messages[1]


def test_a_scale_heading_to_zero_is_named() -> None:
    def scale_model(x: Tensor, y: Tensor | None = None) -> None:
        tau = pyro.sample("tau", dist.HalfNormal(x.new_ones(())))
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 5.0))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            a = pyro.sample("a", dist.Normal(mu, tau).expand([x.shape[0], 1, 1]).to_event(1))
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(a[..., 0], 1.0), obs=None if y is None else y[..., 0])

    batch = TaskBatch(
        torch.zeros(8, 4, 1), torch.randn(8, 4, 1), torch.zeros(8, 4, 1), torch.randn(8, 4, 1)
    )
    sites = model_structure(scale_model, batch.support_x, batch.support_y).global_sites
    start = {"tau": torch.tensor(0.8), "mu": torch.tensor(0.0)}
    with pytest.warns(UserWarning, match="'tau' fell from 0.8 to 1e-05, towards its boundary"):
        boundary_warnings(
            sites, start, {"tau": torch.tensor(1e-5), "mu": torch.tensor(3.0)}, "maml"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        boundary_warnings(sites, start, {"tau": torch.tensor(0.2), "mu": torch.tensor(0.0)}, "maml")


@pytest.mark.filterwarnings("ignore:fit stopped before converging")
def test_a_full_batch_lbfgs_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Empirical Bayes by L-BFGS: 3 iterations, a resume, then 5 more equal 8 straight ones
    (the resumed run once drew its tasks in another order, and its sums rounded otherwise)."""
    from hierbayes.models import ContextualEffects
    from hierbayes.tasks import radon_tasks

    tasks = radon_tasks()
    options = dict(method="llama", objective="evidence", progress=False)
    straight = fit(ContextualEffects(), tasks, meta_steps=8, **options)
    path = tmp_path / "eb.pt"
    fit(ContextualEffects(), tasks, meta_steps=3, checkpoint=path, **options)
    resumed = fit(ContextualEffects(), tasks, meta_steps=8, resume=path, **options)
    assert resumed.history == straight.history
    for name, value in straight.params.items():
        assert torch.equal(resumed.params[name], value), name
