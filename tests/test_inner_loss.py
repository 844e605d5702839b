"""The inner step's loss: summed log likelihood, its mean, or MAML's mean squared error."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hierbayes.inference import TruncatedGradientGuide, fit
from hierbayes.models import NeuralRegression
from hierbayes.tasks import TaskCollection
from tests.helpers import regression_batch, tiny_mlp


def ragged() -> TaskCollection:
    g = torch.Generator().manual_seed(0)
    return TaskCollection(
        [
            (
                torch.randn(n, 1, generator=g),
                torch.randn(n, 1, generator=g),
                torch.randn(4, 1, generator=g),
                torch.randn(4, 1, generator=g),
            )
            for n in (3, 7, 5)
        ]
    )


@pytest.mark.parametrize("loss", ["mean", "mse"])
def test_a_step_on_the_mean_or_mse_is_the_summed_step_with_the_effective_step_size(
    loss: str,
) -> None:
    """One step on MSE (or the mean NLL) with alpha equals one step on the summed log likelihood
    with each task's effective step: 2 sigma^2 alpha / N_j (or alpha / N_j), masks included."""
    batch = ragged().sample(3, generator=torch.Generator().manual_seed(1))
    model = NeuralRegression(tiny_mlp(4), noise_scale=0.7)
    guide = TruncatedGradientGuide(model, batch, step_size=0.05, inner_loss=loss)  # type: ignore[arg-type]
    summed = TruncatedGradientGuide(model, batch, step_size=1.0)
    params = guide.global_values()
    x, y, m = batch.support_x, batch.support_y, batch.support_mask
    effective = guide.effective_step_size(params, x, m)
    counts = m.sum(1).double()
    expected = (2 * 0.7**2 if loss == "mse" else 1.0) * 0.05 / counts
    assert_close(effective, expected)
    phi = guide.adapt(params, x, y, m)
    phi_sum = torch.stack(
        [
            summed.adapt(
                params, x[j : j + 1], y[j : j + 1], m[j : j + 1], step_size=float(effective[j])
            )[0]
            for j in range(3)
        ]
    )
    assert_close(phi, phi_sum, rtol=1e-10, atol=1e-12)


def test_the_mse_step_does_not_depend_on_the_learned_noise_scale() -> None:
    batch = regression_batch()
    a = NeuralRegression(tiny_mlp(4), noise_scale=0.3)
    b = NeuralRegression(tiny_mlp(4), noise_scale=3.0)
    ga = TruncatedGradientGuide(a, batch, inner_loss="mse")
    gb = TruncatedGradientGuide(b, batch, inner_loss="mse")
    pa, pb = ga.global_values(), gb.global_values()
    assert_close(
        ga.adapt(pa, batch.support_x, batch.support_y),
        gb.adapt(pb, batch.support_x, batch.support_y),
    )


def test_mse_with_a_joint_step_is_refused_and_fit_passes_the_option() -> None:
    batch = regression_batch()
    with pytest.raises(ValueError, match="likelihood-only"):
        TruncatedGradientGuide(
            NeuralRegression(tiny_mlp(3)), batch, inner_loss="mse", inner_objective="joint"
        )
    result = fit(
        NeuralRegression(tiny_mlp(3)), batch, inner_loss="mse", meta_steps=2, progress=False
    )
    assert result.guide.inner_loss == "mse" and result.config["inner_loss"] == "mse"


def test_a_learned_prior_scale_without_hyperprior_is_a_parameter_that_fit_and_svi_train() -> None:
    batch = regression_batch()
    model = NeuralRegression(
        tiny_mlp(4), prior_scale=0.1, learn_prior_scale=True, prior_scale_hyperprior=None
    )
    assert "prior_scale" not in [
        s.name for s in TruncatedGradientGuide(model, batch).structure.global_sites
    ]
    before = float(model.prior_scale_param.detach())
    result = fit(model, batch, method="llama", meta_steps=5, lr=0.05, progress=False)
    after = float(model.prior_scale_param.detach())
    assert after != before
    assert result.params["prior_scale_param"].item() == after
