"""Numerical floors: a clamp at zero is silent on round-off and says so beyond it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.testing import assert_close

from hierbayes.inference.core.numerics import (
    ClampWarning,
    clamp_nonnegative,
    nonnegative_eigenvalues,
    roundoff_tolerance,
)
from hierbayes.inference.diagnostics.wasserstein import symmetric_sqrt


def test_a_materially_negative_entry_is_clamped_with_a_count() -> None:
    values = torch.tensor([1.0, -0.25, 0.5, -0.01, 2.0])
    with pytest.warns(
        ClampWarning,
        match=r"the test variance: 2 of 5 entries were negative beyond round-off \(the most "
        r"negative -0\.25, the largest magnitude 2\).*set to 0",
    ):
        out = clamp_nonnegative(values, "the test variance")
    assert_close(out, torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0]))


def test_float32_advice_is_float64_and_float64_advice_is_the_matrix() -> None:
    with pytest.warns(ClampWarning, match=r"In torch\.float32 .*compute in float64"):
        clamp_nonnegative(torch.tensor([1.0, -0.5], dtype=torch.float32), "v")
    with pytest.warns(ClampWarning, match=r"ill-conditioned or not positive semi-definite"):
        clamp_nonnegative(torch.tensor([1.0, -0.5], dtype=torch.float64), "v")
    with pytest.warns(ClampWarning, match=r"do this instead"):
        clamp_nonnegative(torch.tensor([1.0, -0.5]), "v", advice="do this instead")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_off_and_non_negative_values_are_clamped_silently(dtype: torch.dtype) -> None:
    eps = torch.finfo(dtype).eps
    assert roundoff_tolerance(dtype) == pytest.approx(math.sqrt(eps))
    cases = [
        torch.tensor([3.0, 0.0, 1.0], dtype=dtype),  # nothing negative
        torch.tensor([3.0, -10 * eps, 1.0], dtype=dtype),  # round-off of the largest entry
        torch.zeros(4, dtype=dtype),
        torch.empty(0, dtype=dtype),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for values in cases:
            assert_close(clamp_nonnegative(values, "v"), values.clamp_min(0))
        # with the terms' own scale, a negative at their round-off is silent even when every
        # result is tiny
        tiny = torch.tensor([-50 * eps, 1e-3 * eps], dtype=dtype)
        clamp_nonnegative(tiny, "v", scale=torch.ones(2, dtype=dtype))
    with pytest.warns(ClampWarning, match="1 of 2 entries"):
        clamp_nonnegative(tiny, "v")  # against the largest entry alone it is material


def test_the_clamp_stays_differentiable() -> None:
    values = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    with pytest.warns(ClampWarning):
        out = clamp_nonnegative(values * 3.0, "v")
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), values)
    assert_close(grad, torch.tensor([3.0, 0.0, 3.0]))
    # and twice differentiable where positive (the meta-gradient differentiates through it)
    x = torch.tensor([0.7, 1.3], requires_grad=True)
    y = clamp_nonnegative(x.square(), "v").sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert_close(h, torch.tensor([2.0, 2.0]))


def test_eigenvalue_floor_uses_each_matrix_own_scale() -> None:
    # the second matrix is tiny but clearly indefinite; the first is large and fine
    evals = torch.tensor([[0.0, 1e6, 2e6], [-1e-3, 1e-3, 2e-3]])
    with pytest.warns(ClampWarning, match=r"eigenvalues of m: 1 of 6 entries"):
        out = nonnegative_eigenvalues(evals, "m")
    assert_close(out, evals.clamp_min(0))


def test_symmetric_sqrt_warns_on_an_indefinite_matrix_only() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    psd = A @ A.transpose(-1, -2)
    psd[0] = psd[0] @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)) @ psd[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = symmetric_sqrt(psd)  # semi-definite, with a zero eigenvalue: round-off only
    assert_close(root @ root, psd)
    indefinite = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    with pytest.warns(ClampWarning, match=r"eigenvalues of the matrix in symmetric_sqrt: 1 of 3"):
        root = symmetric_sqrt(indefinite)
    assert_close(root, torch.diag(torch.tensor([2.0, 0.0, 0.5], dtype=torch.float64)).sqrt())


def test_the_gaussian_draws_square_root_of_an_indefinite_covariance_warns() -> None:
    from hierbayes.inference.core.numerics import ClampWarning
    from hierbayes.inference.posteriors.gaussian import covariance_factor

    indefinite = torch.tensor([[[1.0, 0.0], [0.0, -0.5]]], dtype=torch.float64)
    with pytest.warns(ClampWarning, match="Cholesky factorisation failed"):
        factor = covariance_factor(indefinite)
    assert_close(factor @ factor.mT, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64))


def test_fisher_square_roots_have_finite_gradients_where_probabilities_underflow() -> None:
    """repro_12: sqrt(p) of a softmax (and sqrt(p(1-p)) of a sigmoid) was differentiated at
    p = 0 in float32, and inf * 0 turned the meta-gradient NaN. The factors are computed from
    log-probabilities, whose gradients stay finite, and still square to the Fisher."""
    import pyro.distributions as dist

    from hierbayes.inference.curvature.observation import exact_fisher
    from hierbayes.models import CategoricalLikelihood

    logits = torch.tensor([[[0.0, 120.0, -5.0]]], dtype=torch.float32, requires_grad=True)
    assert float(torch.softmax(logits.detach(), -1)[0, 0, 0]) == 0.0  # underflows in float32
    factor = CategoricalLikelihood().output_factor(logits, {})
    (grad,) = torch.autograd.grad(factor.square().sum(), logits)
    assert bool(torch.isfinite(grad).all())
    p = torch.softmax(logits.double(), -1)
    fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    assert_close((factor @ factor.mT).double(), fisher, atol=1e-6, rtol=0)

    phi = torch.tensor([200.0, -3.0], dtype=torch.float32, requires_grad=True)
    for fn in (dist.Bernoulli(logits=phi), dist.Categorical(logits=torch.stack([phi, -phi], -1))):
        pieces = exact_fisher(fn, phi)
        assert pieces is not None
        total = sum(piece.square().sum() for _, piece in pieces)
        (grad,) = torch.autograd.grad(total, phi)
        assert bool(torch.isfinite(grad).all()), type(fn).__name__
