"""Meta-training from a pretrained network, and per-parameter step sizes given as a tensor
(the start of Meta-SGD's learned preconditioner, or another run's learned step sizes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import hierbayes
from hierbayes.__main__ import main
from hierbayes.experiments.omniglot import OmniglotConfig, config_for
from hierbayes.experiments.omniglot.evaluation import evaluate_probs, predict_all
from hierbayes.experiments.omniglot.pretrain import (
    finetune_head,
    pretrain_network,
    pretrained_theta,
)
from hierbayes.experiments.omniglot.training import laplace_scores
from hierbayes.inference import TruncatedGradientGuide, fit
from hierbayes.models import ConvClassifier
from hierbayes.models.conv import conv4_network
from hierbayes.tasks import ImageDataset, TaskBatch, load_omniglot

from .test_any_likelihood import logistic, simulate


def _dataset(classes: int = 6, per_class: int = 4, side: int = 28) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(classes * per_class, 1, side, side, generator=g).float()
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(classes)))


def _batch(T: int = 2, ways: int = 3, dtype: torch.dtype = torch.float32) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(T, ways, 1, 28, 28, generator=g).to(dtype)
    y = torch.arange(ways).expand(T, -1).clone()
    return TaskBatch(x, y, x, y)


# -- pretraining as MAML's starting point ------------------------------------------------------


def test_pretrained_theta_takes_the_convolutions_and_keeps_the_models_head() -> None:
    net = conv4_network(11)  # a head over 11 pretraining classes
    model = ConvClassifier(3)
    theta = pretrained_theta(model, net)
    convs = torch.cat([p.detach().reshape(-1) for p in list(net.parameters())[:-2]])
    assert theta.shape == model.theta_init.shape
    torch.testing.assert_close(theta[: convs.numel()], convs)
    torch.testing.assert_close(theta[convs.numel() :], model.theta_init[convs.numel() :])
    # the first and last convolution weights land where the model's network reads them
    first, last = net[0].weight.reshape(-1), list(net.parameters())[-3].reshape(-1)
    torch.testing.assert_close(theta[: first.numel()], first)
    torch.testing.assert_close(theta[convs.numel() - last.numel() : convs.numel()], last)


def test_pretrained_theta_refuses_a_network_of_another_shape() -> None:
    with pytest.raises(ValueError, match="same blocks, filters and image size"):
        pretrained_theta(ConvClassifier(3), conv4_network(11, filters=32))


def test_pretraining_learns_the_training_classes_and_finetuning_uses_the_support() -> None:
    data = _dataset()
    cfg = OmniglotConfig(pretrain_steps=60, pretrain_batch_size=24, lr=3e-3, max_shift=0)
    net = pretrain_network(data, cfg)
    with torch.no_grad():
        accuracy = (net(data.images).argmax(-1) == data.labels).double().mean()
    assert accuracy > 0.9  # 24 random images of 6 classes are memorised
    # fine-tuning on a support set that is its own query classifies it
    x = data.images[::4][:3].unsqueeze(0)
    batch = TaskBatch(x, torch.arange(3).unsqueeze(0), x, torch.arange(3).unsqueeze(0))
    probs = finetune_head(net, batch, cfg)
    assert probs.shape == (1, 3, 3)
    assert (probs.argmax(-1) == torch.arange(3)).all()


def test_pretraining_needs_steps() -> None:
    with pytest.raises(ValueError, match="pretrain_steps"):
        pretrain_network(_dataset(), OmniglotConfig(pretrain_steps=0))


# -- step sizes given as a tensor ----------------------------------------------------------------


def test_a_tensor_of_step_sizes_is_the_inner_loops_diagonal_preconditioner() -> None:
    batch = _batch(dtype=torch.float64)
    model = ConvClassifier(3)
    D = model.num_params
    alpha = torch.rand(D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha = alpha * 0.1 + 0.01
    guide = TruncatedGradientGuide(model, batch, step_size=alpha, learn_step_size="per_parameter")
    torch.testing.assert_close(guide.step_size.detach(), alpha)
    fixed = TruncatedGradientGuide(model, batch, step_size=alpha, inner_loss="mean")
    torch.testing.assert_close(fixed.step_size, alpha)
    # one step of the guide is theta + alpha * grad with that alpha, entry by entry
    params = fixed.global_values()
    x, y = batch.support_x, batch.support_y
    with torch.no_grad():
        phi = fixed.adapt(params, x, y)
    theta = model.theta_init.expand(2, D).detach().requires_grad_(True)
    value = fixed.density.log_likelihood(params, theta, x, y) / x.shape[1]
    (grad,) = torch.autograd.grad(value.sum(), theta)
    torch.testing.assert_close(phi, (theta + alpha * grad).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "mode", "match"),
    [
        (lambda D: torch.full((5,), 0.1), "per_parameter", "shape"),  # not (D,)
        (lambda D: torch.full((D,), 0.1), "scalar", "shape"),  # a vector for one scalar
        (lambda D: torch.full((D,), -0.1), "fixed", "positive"),
        (lambda D: torch.tensor(float("nan")), "fixed", "positive"),
    ],
)
def test_bad_step_size_tensors_are_refused(make: Any, mode: str, match: str) -> None:
    batch = _batch(dtype=torch.float64)
    model = ConvClassifier(3)
    with pytest.raises(ValueError, match=match):
        TruncatedGradientGuide(model, batch, step_size=make(model.num_params), learn_step_size=mode)  # type: ignore[arg-type]


def test_a_tensor_step_size_on_a_plain_bernoulli_program() -> None:
    """A user's own Pyro program (logistic regression per task): one step of the guide with a
    (D,) step size is theta + alpha * grad of the summed support log likelihood, per entry."""
    batch = simulate(logistic, T=3, N=6, M=4)
    alpha = torch.tensor([0.05, 0.2, 0.01], dtype=torch.float64)
    guide = TruncatedGradientGuide(logistic, batch, step_size=alpha)
    params = guide.global_values()
    x, y = batch.support_x, batch.support_y
    with torch.no_grad():
        phi = guide.adapt(params, x, y)
    start = guide.density.prior_mean(params, x).detach().requires_grad_(True)
    value = guide.density.log_likelihood(params, start, x, y)
    (grad,) = torch.autograd.grad(value.sum(), start)
    torch.testing.assert_close(phi, (start + alpha * grad).detach())
    assert not torch.allclose(phi, (start + 0.05 * grad).detach())  # the per-entry alpha matters


def test_a_fit_started_from_another_runs_step_sizes_saves_and_loads(tmp_path: Path) -> None:
    batch = _batch()
    first = fit(
        ConvClassifier(3),
        batch,
        meta_steps=2,
        step_size=0.05,
        learn_step_size="per_parameter",
        progress=False,
        dtype=torch.float32,
    )
    learned = first.guide.step_size.detach().clone()
    assert not torch.allclose(learned, torch.full_like(learned, 0.05))  # it learned
    second = fit(
        ConvClassifier(3),
        batch,
        meta_steps=1,
        step_size=learned,
        learn_step_size="per_parameter",
        lr=1e-12,
        progress=False,
        dtype=torch.float32,
    )
    torch.testing.assert_close(second.guide.step_size.detach(), learned, rtol=1e-5, atol=0)
    second.save(tmp_path / "run.pt")
    loaded = hierbayes.load(tmp_path / "run.pt")
    torch.testing.assert_close(loaded.guide.step_size, second.guide.step_size)


# -- the experiment ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::hierbayes.inference.training.guards.InnerLoopWarning")
def test_the_omniglot_run_starts_from_the_pretrained_network(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["omniglot", "--ways", "3", "--method", "maml", "--meta-steps", "2"]
    args += ["--meta-batch-size", "2", "--eval-episodes", "3", "--pretrain-steps", "2"]
    args += ["--eval-inner-steps", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init"] == "pretrained"
    assert metrics["config"]["learn_step_size"] == "per_parameter"
    assert "pretrain_finetune" in metrics["baselines"]
    loaded = hierbayes.load(out / "model.pt")
    # the saved theta_0 (the hyperprior's centre) holds the pretrained network's convolutions
    cfg = config_for("cpu", 3, 1, "maml", pretrain_steps=2, meta_batch_size=2)
    net = pretrain_network(load_omniglot(cfg.train_source, rotations=True), cfg)
    first = net[0].weight.detach().reshape(-1)
    torch.testing.assert_close(loaded.model.theta_init[: first.numel()].float(), first)
    assert loaded.guide.step_size.shape == (loaded.model.num_params,)
    with pytest.raises(SystemExit):
        main(["omniglot", "--init", "nowhere"])


# -- the Laplace predictive over prior scales ----------------------------------------------------


@pytest.mark.filterwarnings("ignore::hierbayes.inference.training.guards.InnerLoopWarning")
def test_laplace_scores_point_mass_is_the_runs_prediction_and_tiny_spread_tends_to_it() -> None:
    batch = _batch(T=4)
    result = fit(
        ConvClassifier(3),
        batch,
        meta_steps=2,
        step_size=0.4,
        inner_loss="mean",
        progress=False,
        dtype=torch.float32,
    )
    cfg = OmniglotConfig(ways=3, eval_chunk=3, eval_inner_steps=2, predictive_samples=20)
    scores = laplace_scores(result, batch, cfg, [1e-6, 10.0])
    assert list(scores) == ["point", "1e-06", "10"]
    expected = evaluate_probs(predict_all(result, batch, cfg), batch.query_y.long())
    assert scores["point"]["nll"]["mean"] == pytest.approx(expected["nll"]["mean"], rel=1e-6)
    assert scores["point"]["ece"] == pytest.approx(expected["ece"], rel=1e-6)
    # a vanishing spread is the point mass; a wide one is not
    assert scores["1e-06"]["nll"]["mean"] == pytest.approx(expected["nll"]["mean"], abs=1e-4)
    assert abs(scores["10"]["nll"]["mean"] - expected["nll"]["mean"]) > 1e-3
