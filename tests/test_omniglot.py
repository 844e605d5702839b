"""Omniglot: the bundled data, the conv classifier's batched path, the inner loop's gradient
checkpointing, memory over second-order meta-steps, and the experiment end to end."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import hierbayes
from hierbayes.__main__ import main
from hierbayes.errors import TaskDataError
from hierbayes.experiments.omniglot import (
    TEST_ALPHABETS,
    ShiftedEpisodes,
    classify,
    evaluate_probs,
    expected_calibration_error,
    sampled_fisher_diagonal,
)
from hierbayes.inference import fit
from hierbayes.inference.core.inner_loop import adapt_tasks
from hierbayes.inference.curvature import build_curvature
from hierbayes.inference.curvature.base import CurvatureInputs
from hierbayes.models import ConvClassifier, model_structure
from hierbayes.models.conv import conv4_network
from hierbayes.tasks import TaskBatch, load_omniglot


def _images(T: int, N: int, side: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(T, N, 1, side, side, generator=torch.Generator().manual_seed(seed))


def _labels(T: int, ways: int, per_class: int) -> torch.Tensor:
    return torch.arange(ways).repeat_interleave(per_class).expand(T, -1).clone()


def _small(ways: int = 3, **kwargs: object) -> ConvClassifier:
    return ConvClassifier(ways, image_size=12, filters=6, blocks=3, **kwargs)  # type: ignore[arg-type]


# -- the bundled data ------------------------------------------------------------------------


def test_bundled_small1_counts() -> None:
    data = load_omniglot("images_background_small1")
    alphabets = {name.split("/")[0] for name in data.class_names}
    assert alphabets == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    assert data.num_classes == 136
    assert torch.equal(torch.bincount(data.labels), torch.full((136,), 20))
    assert data.images.shape == (136 * 20, 1, 28, 28)
    test = load_omniglot("images_background_small2", alphabets=TEST_ALPHABETS)
    assert {name.split("/")[0] for name in test.class_names} == set(TEST_ALPHABETS)
    assert not alphabets & set(TEST_ALPHABETS)
    assert test.num_classes == 106 and len(test) == 106 * 20


# -- the model -------------------------------------------------------------------------------


def test_conv4_network_layout() -> None:
    net = conv4_network(5)
    assert sum(p.numel() for p in net.parameters()) == 111_168 + 257 * 5
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    model = ConvClassifier(5)
    assert model.num_params == 112_453
    assert model.net.has_fast_path and model.net.has_batch_norm
    pooled = conv4_network(5, in_channels=3, image_size=84, filters=32, downsample="maxpool")
    assert pooled(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_grouped_path_equals_a_loop_over_tasks(downsample: str) -> None:
    """Outputs, and the second-order meta-gradient of the query NLL after two inner steps,
    of the grouped-convolution path against each task run alone through the module."""
    model = ConvClassifier(3, image_size=16, filters=5, downsample=downsample)  # type: ignore[arg-type]
    T, N = 4, 6
    x, xq = _images(T, N, 16), _images(T, N, 16, seed=1)
    y = _labels(T, 3, 2)
    theta = model.theta_init.clone().requires_grad_(True)
    phi = theta + 0.05 * torch.randn(T, theta.shape[0], generator=torch.Generator().manual_seed(3))
    layout, module = model.net.layout, model.net.module

    def looped(p: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [functional_call(module, layout.unflatten(p[t]), (inputs[t],)) for t in range(T)]
        )

    torch.testing.assert_close(model.net(phi, x), looped(phi, x), rtol=0, atol=1e-10)

    def meta_gradient(forward: object) -> torch.Tensor:
        current = theta.expand(T, -1)
        for _ in range(2):
            f = forward(current, x)  # type: ignore[operator]
            loss = torch.nn.functional.cross_entropy(f.reshape(-1, 3), y.reshape(-1))
            (g,) = torch.autograd.grad(loss, current, create_graph=True)
            current = current - 0.4 * g
        fq = forward(current, xq)  # type: ignore[operator]
        loss = torch.nn.functional.cross_entropy(fq.reshape(-1, 3), y.reshape(-1))
        (grad,) = torch.autograd.grad(loss, theta)
        return grad

    torch.testing.assert_close(meta_gradient(model.net), meta_gradient(looped), rtol=0, atol=1e-10)


def test_labels_outside_the_classes_are_refused() -> None:
    x = _images(2, 4)
    bad = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])
    batch = TaskBatch(x, bad, x, bad)
    with pytest.raises(TaskDataError, match=r"labels must lie in 0\.\.2"):
        fit(_small(3), batch, meta_steps=1, progress=False)


def test_the_built_in_model_is_described_for_loading() -> None:
    model = ConvClassifier(4, filters=8, prior_scale=0.5)
    assert model.constructor == {
        "class": "ConvClassifier",
        "kwargs": dict(
            ways=4,
            in_channels=1,
            image_size=28,
            filters=8,
            blocks=4,
            downsample="stride",
            prior_scale=0.5,
            learn_prior_scale=False,
            hyperprior_scale=10.0,
            prior_scale_hyperprior=1.0,
        ),
    }


# -- the inner loop: gradient checkpointing ----------------------------------------------------


@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_checkpointed_inner_loop_gives_the_same_gradients(loss: str) -> None:
    model = _small(3)
    x, xq = _images(3, 6), _images(3, 6, seed=1)
    y = _labels(3, 3, 2)
    structure = model_structure(model, x, y)
    density = model.task_density(structure)
    theta0 = model.theta_init.clone()

    def run(checkpoint: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = theta0.clone().requires_grad_(True)
        alpha = torch.tensor(0.3, requires_grad=True)
        params = {"theta": theta}
        phi = adapt_tasks(
            density,
            params,
            x,
            y,
            steps=3,
            step_size=alpha,
            joint=True,
            loss=loss,  # type: ignore[arg-type]
            checkpoint=checkpoint,
        )
        value = -density.log_likelihood(params, phi, xq, y).sum()
        g_theta, g_alpha = torch.autograd.grad(value, (theta, alpha))
        return phi.detach(), g_theta, g_alpha

    plain, checked = run(False), run(True)
    for a, b in zip(plain, checked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_guide_option_reaches_the_inner_loop() -> None:
    from hierbayes.inference import TruncatedGradientGuide

    x = _images(2, 6)
    y = _labels(2, 3, 2)
    model = _small(3)
    plain = TruncatedGradientGuide(model, (x, y), inner_steps=2, step_size=0.3)
    checked = TruncatedGradientGuide(
        model, (x, y), inner_steps=2, step_size=0.3, gradient_checkpointing=True
    )
    params = plain.global_values()
    torch.testing.assert_close(
        plain.adapt(params, x, y), checked.adapt(params, x, y), rtol=0, atol=1e-12
    )


# -- memory ----------------------------------------------------------------------------------


def _live_tensor_bytes() -> tuple[int, int]:
    gc.collect()
    storages: dict[int, int] = {}
    count = 0
    with warnings.catch_warnings():  # deprecated module attributes warn when inspected
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if isinstance(obj, torch.Tensor):
                count += 1
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (ReferenceError, RuntimeError):
            continue
    return count, sum(storages.values())


def test_second_order_maml_memory_is_flat_over_meta_steps() -> None:
    """Live tensors (count and bytes) after each of 20 second-order meta-steps of the conv
    network do not grow once the optimiser's state exists."""
    data = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8).repeat_interleave(5)
    from hierbayes.tasks import EpisodicSampler

    source = EpisodicSampler(data, labels, ways=3, shots=1, query_shots=2)
    seen: list[tuple[int, int]] = []

    def callback(step: int, loss: float, result: object) -> None:
        seen.append(_live_tensor_bytes())

    fit(
        _small(3),
        source,
        meta_steps=20,
        meta_batch_size=4,
        inner_steps=2,
        step_size=0.3,
        inner_loss="mean",
        first_order=False,
        progress=False,
        callback=callback,
    )
    warm = seen[3]
    assert all(count <= warm[0] for count, _ in seen[3:]), seen
    assert all(nbytes <= warm[1] for _, nbytes in seen[3:]), seen


# -- curvature, metrics, augmentation ------------------------------------------------------------


def test_sampled_fisher_diagonal_is_unbiased_for_the_exact_diagonal() -> None:
    model = ConvClassifier(3, image_size=8, filters=3, blocks=2)
    x = _images(2, 6, 8)
    y = _labels(2, 3, 2)
    structure = model_structure(model, x, y)
    density = model.task_density(structure)
    phi = model.theta_init.expand(2, -1).clone()
    P = torch.full((model.num_params,), 1.0)
    inputs = CurvatureInputs(density, {"theta": model.theta_init}, phi, x, y, None, P, False)
    exact = build_curvature("diag", inputs).to_dense().diagonal(dim1=-2, dim2=-1) - 1.0
    draws = torch.stack(
        [
            sampled_fisher_diagonal(inputs, seed=s).to_dense().diagonal(dim1=-2, dim2=-1) - 1.0
            for s in range(400)
        ]
    )
    again = sampled_fisher_diagonal(inputs, seed=7).to_dense()
    torch.testing.assert_close(again, sampled_fisher_diagonal(inputs, seed=7).to_dense())
    mean, err = draws.mean(0), draws.std(0) / 20
    assert bool(((mean - exact).abs() <= 5 * err + 1e-9).all())


def test_calibration_error_and_metrics_by_hand() -> None:
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]]])
    labels = torch.tensor([[0, 1, 1, 0]])
    # bins of width 1/15: 0.9 right, 0.6 wrong, 0.8 right, 0.55 right, each its own bin
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.55)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    m = evaluate_probs(probs, labels)
    assert m["accuracy"]["mean"] == pytest.approx(0.75)
    nll = -(torch.tensor([0.9, 0.4, 0.8, 0.55]).log().mean())
    assert m["nll"]["mean"] == pytest.approx(float(nll))


def test_shifted_episodes_are_reproducible_shifts() -> None:
    images = torch.zeros(12, 1, 10, 10)
    images[:, :, 4:6, 4:6] = 1.0
    from hierbayes.tasks import EpisodicSampler

    source = ShiftedEpisodes(
        EpisodicSampler(
            images, torch.arange(4).repeat_interleave(3), ways=2, shots=1, query_shots=1
        ),
        2,
    )
    a = source.sample(5, generator=torch.Generator().manual_seed(0))
    b = source.sample(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.support_x, b.support_x, rtol=0, atol=0)
    assert a.support_x.sum(dim=(-1, -2, -3)).eq(4).all()  # shifted, never cut off
    ink = a.support_x.flatten(0, 1)[:, 0].nonzero()[:, 1:]
    assert ink.min() >= 2 and ink.max() <= 7


# -- the experiment ----------------------------------------------------------------------------


# a step of 0.4 from a random initialisation may raise the support loss at the first check
QUIET_GUARD = pytest.mark.filterwarnings(
    "ignore::hierbayes.inference.training.guards.InnerLoopWarning"
)


@QUIET_GUARD
def test_omniglot_command_end_to_end_and_the_saved_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["omniglot", "--ways", "3", "--shots", "1", "--method", "maml", "--meta-steps", "4"]
    args += ["--meta-batch-size", "2", "--eval-episodes", "6", "--pretrain-steps", "3"]
    args += ["--out", str(out), "--no-progress"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) >= {"mean", "ci95"}
    assert metrics["accuracy"]["n"] == 6
    assert {"nll", "ece", "baselines"} <= set(metrics)
    assert set(metrics["baselines"]) == {"pixel_nearest_neighbour", "pretrain_finetune"}
    assert (out / "episodes.png").stat().st_size > 0
    # a saved run loads without the model and classifies exactly as before
    loaded = hierbayes.load(out / "model.pt")
    assert isinstance(loaded.model, ConvClassifier)
    test = load_omniglot("images_background_small2", alphabets=["Tagalog"])
    batch = test.episodes(ways=3, shots=1, query_shots=2).sample(
        2, generator=torch.Generator().manual_seed(0)
    )
    assert batch.query_x is not None
    probs = classify(out / "model.pt", batch.support_x, batch.support_y, batch.query_x)
    again = classify(loaded, batch.support_x, batch.support_y, batch.query_x)
    assert probs.shape == (2, 6, 3)
    torch.testing.assert_close(probs, again, rtol=0, atol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6, dtype=probs.dtype))


@QUIET_GUARD
@pytest.mark.parametrize("warm_start", [False, True])
def test_llama_run_end_to_end(tmp_path: Path, warm_start: bool) -> None:
    out = tmp_path / "llama"
    args = ["omniglot", "--ways", "3", "--method", "llama", "--meta-steps", "3"]
    args += ["--llama-steps", "2", "--meta-batch-size", "2", "--llama-batch-size", "2"]
    args += ["--eval-episodes", "3", "--pretrain-steps", "0", "--init", "random"]
    args += ["--predictive-samples", "3"]
    args += ["--out", str(out), "--no-progress"]
    if warm_start:
        x = load_omniglot("images_background_small1", alphabets=["Latin"]).images[:6]
        batch = TaskBatch(x.reshape(2, 3, 1, 28, 28), _labels(2, 3, 1))
        batch = TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y)
        maml = fit(ConvClassifier(3), batch, meta_steps=2, progress=False, dtype=torch.float32)
        maml.save(tmp_path / "maml.pt")
        args += ["--warm-start", str(tmp_path / "maml.pt")]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["llama"]["objective"] == "paper"
    assert metrics["llama"]["llama_loss_steps"] == 2
    assert metrics["llama"]["maml_loss_steps"] == (2 if warm_start else 1)
    loaded = hierbayes.load(out / "model.pt")
    assert loaded.method == "llama"
    if warm_start:
        torch.testing.assert_close(loaded.model.theta_init, maml.theta.float())
