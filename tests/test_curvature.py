"""Curvature backends against their own dense matrices, the exact Hessian and the exact Fisher."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature import (
    CurvatureEstimate,
    CurvatureInputs,
    DiagonalCurvature,
    available_curvatures,
    build_curvature,
    get_curvature,
    output_jacobian,
    register_curvature,
)
from hierbayes.inference.curvature.kfac import kfac
from hierbayes.models import (
    BayesianLinearRegression,
    CategoricalLikelihood,
    NeuralRegression,
    PyroTaskDensity,
    TaskModel,
    model_structure,
    task_density,
)
from hierbayes.tasks import TaskBatch
from tests.helpers import regression_batch, tiny_mlp

TOL = dict(atol=1e-8, rtol=1e-8)


def regression_inputs(
    T: int = 3, N: int = 5, *, mask: bool = False, create_graph: bool = False
) -> CurvatureInputs:
    batch = regression_batch(T=T, N=N)
    model = NeuralRegression(tiny_mlp(4))
    structure = model_structure(model, batch.support_x, batch.support_y)
    density = task_density(model, structure)
    params = {"theta": model.theta_init, "noise_scale": torch.tensor(0.6)}
    phi = model.theta_init + 0.3 * torch.randn(T, structure.num_params)
    m = None
    if mask:
        m = torch.ones(T, N, dtype=torch.bool)
        m[0, -2:] = False
        m[2, 1] = False
    P = torch.full((structure.num_params,), 2.0)
    return CurvatureInputs(
        density, params, phi, batch.support_x, batch.support_y, m, P, create_graph
    )


def classification_inputs(T: int = 2, N: int = 4, C: int = 3) -> CurvatureInputs:
    torch.manual_seed(1)
    model = TaskModel(
        nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, C)), CategoricalLikelihood()
    )
    batch = TaskBatch(torch.randn(T, N, 2), torch.randint(0, C, (T, N)))
    structure = model_structure(model, batch.support_x, batch.support_y)
    density = task_density(model, structure)
    params = {"theta": model.theta_init}
    phi = model.theta_init + 0.5 * torch.randn(T, structure.num_params)
    P = torch.full((structure.num_params,), 1.5)
    return CurvatureInputs(density, params, phi, batch.support_x, batch.support_y, None, P, False)


CASES = {
    "regression": lambda: regression_inputs(),
    "masked": lambda: regression_inputs(mask=True),
    "classification": lambda: classification_inputs(),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["ggn", "diag", "kfac", "full"])
def test_logdet_solve_and_samples_against_the_dense_matrix(name: str, case: str) -> None:
    inputs = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "full" may repair an indefinite Hessian
        estimate = build_curvature(name, inputs)
    H = estimate.to_dense()
    T, D = inputs.phi.shape
    assert H.shape == (T, D, D)
    assert_close(H, H.transpose(1, 2), **TOL)
    evals = torch.linalg.eigvalsh(H)
    assert bool((evals > 0).all()), "every backend is positive definite"
    assert_close(estimate.logdet(), evals.log().sum(-1), **TOL)
    rhs = torch.randn(T, D)
    expected = torch.linalg.solve(H, rhs.unsqueeze(-1)).squeeze(-1)
    assert_close(estimate.solve(rhs), expected, **TOL)
    assert_close(
        estimate.solve(rhs.unsqueeze(-1).expand(T, D, 2)),
        expected.unsqueeze(-1).expand(T, D, 2),
        **TOL,
    )
    assert_close(estimate.covariance(), torch.linalg.inv(H), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", ["ggn", "diag", "kfac", "full"])
def test_sample_covariance_matches_the_inverse(name: str) -> None:
    inputs = regression_inputs(T=2, N=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        estimate = build_curvature(name, inputs)
    S = 40_000
    draws = estimate.sample(S, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (S, 2, inputs.phi.shape[1])
    cov = torch.einsum("std,ste->tde", draws, draws) / S
    target = estimate.covariance()
    # Monte-Carlo standard error of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / S)
    var = target.diagonal(dim1=-2, dim2=-1)
    se = ((var.unsqueeze(-1) * var.unsqueeze(-2) + target.square()) / S).sqrt()
    assert bool(((cov - target).abs() <= 5 * se + 1e-12).all())


def test_layer_jacobian_equals_autograd_jacobian() -> None:
    for inputs in (regression_inputs(mask=True), classification_inputs()):
        layers, f1 = output_jacobian(inputs, method="layers")
        auto, f2 = output_jacobian(inputs, method="autograd")
        T, D = inputs.phi.shape
        inv = 1.0 / inputs.prior_precision_matrix()
        assert_close(f1, f2, **TOL)
        assert_close(layers.dense(), auto.dense(), **TOL)
        assert_close(layers.gram(inv), auto.gram(inv), **TOL)
        assert_close(layers.gram_diag(inv), auto.gram_diag(inv), **TOL)
        varying = torch.rand_like(inv) + 0.5
        assert_close(layers.gram(varying), auto.gram(varying), **TOL)
        assert_close(layers.gram_diag(varying), auto.gram_diag(varying), **TOL)
        assert_close(layers.column_square_sums(), auto.column_square_sums(), **TOL)
        v = torch.randn(T, D)
        assert_close(layers.matvec(v), auto.matvec(v), **TOL)


def test_conv_layer_jacobian_equals_autograd() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 2)
    )
    model = TaskModel(net, CategoricalLikelihood())
    x, y = torch.randn(2, 3, 1, 4, 4), torch.randint(0, 2, (2, 3))
    structure = model_structure(model, x, y)
    inputs = CurvatureInputs(
        task_density(model, structure),
        {"theta": model.theta_init},
        model.theta_init + 0.2 * torch.randn(2, structure.num_params),
        x,
        y,
        None,
        torch.full((structure.num_params,), 3.0),
        False,
    )
    layers, _ = output_jacobian(inputs, method="layers")
    auto, _ = output_jacobian(inputs, method="autograd")
    inv = 1.0 / inputs.prior_precision_matrix()
    assert_close(layers.dense(), auto.dense(), **TOL)
    assert_close(layers.gram(inv), auto.gram(inv), **TOL)
    assert_close(layers.gram_diag(inv), auto.gram_diag(inv), **TOL)
    assert_close(layers.column_square_sums(), auto.column_square_sums(), **TOL)
    varying = torch.rand_like(inv) + 0.5  # precisions that differ within layers
    assert_close(layers.gram(varying), auto.gram(varying), **TOL)
    assert_close(layers.gram_diag(varying), auto.gram_diag(varying), **TOL)
    estimate = kfac(inputs)
    H = estimate.to_dense()
    assert_close(estimate.logdet(), torch.linalg.eigvalsh(H).log().sum(-1), **TOL)


def test_ggn_equals_full_hessian_on_the_linear_gaussian_model() -> None:
    batch = regression_batch(T=3, N=6, d=3)
    model = BayesianLinearRegression(3, bias=True, noise_scale=0.5)
    structure = model_structure(model, batch.support_x, batch.support_y)
    inputs = CurvatureInputs(
        task_density(model, structure),
        {"theta": model.theta_init},
        torch.randn(3, 4),
        batch.support_x,
        batch.support_y,
        None,
        torch.full((4,), 0.7),
        False,
    )
    ggn, full = build_curvature("ggn", inputs), build_curvature("full", inputs)
    X = torch.cat([batch.support_x, torch.ones(3, 6, 1)], dim=-1)
    exact = X.transpose(1, 2) @ X / 0.25 + 0.7 * torch.eye(4)
    assert_close(ggn.to_dense(), exact, **TOL)
    assert_close(full.to_dense(), exact, **TOL)
    assert_close(ggn.logdet(), full.logdet(), **TOL)


def test_kfac_equals_the_fisher_block_for_one_linear_layer_and_one_point() -> None:
    torch.manual_seed(3)
    C = 3
    model = TaskModel(nn.Sequential(nn.Linear(4, C)), CategoricalLikelihood())
    x, y = torch.randn(2, 1, 4), torch.randint(0, C, (2, 1))
    structure = model_structure(model, x, y)
    inputs = CurvatureInputs(
        task_density(model, structure),
        {"theta": model.theta_init},
        model.theta_init + torch.randn(2, structure.num_params),
        x,
        y,
        None,
        torch.full((structure.num_params,), 0.3),
        False,
    )
    fisher = build_curvature("ggn", inputs).to_dense()  # J^T Λ J + τI, the exact Fisher here
    assert_close(kfac(inputs).to_dense(), fisher, **TOL)


def test_kfac_and_ggn_differ_with_several_points() -> None:
    """The Kronecker factorisation is an approximation: with several points it is not the GGN."""
    inputs = regression_inputs(N=5)
    assert (kfac(inputs).to_dense() - build_curvature("ggn", inputs).to_dense()).abs().max() > 1e-3


def test_indefinite_full_hessian_warns_and_stays_finite() -> None:
    inputs = regression_inputs(T=3, N=5)
    inputs.phi = inputs.phi + 2.0 * torch.randn_like(inputs.phi)  # far from any mode
    inputs.prior_precision = torch.full_like(inputs.prior_precision, 1e-2)
    with pytest.warns(UserWarning, match="not positive definite"):
        estimate = build_curvature("full", inputs)
    assert estimate.repaired_tasks  # type: ignore[attr-defined]
    assert bool(torch.isfinite(estimate.logdet()).all())
    assert bool((torch.linalg.eigvalsh(estimate.to_dense()) >= 1e-2 - 1e-10).all())


@pytest.mark.parametrize("threads", [2])
def test_large_matrices_with_several_threads(threads: int) -> None:
    """torch 2.13's CPU build mis-computes batched slogdet/lu/solve at size >= 256 with more than
    one thread; the backends factorise with Cholesky and stay right at those sizes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        T, N, D = 4, 300, 260
        model = BayesianLinearRegression(D, noise_scale=1.0)
        x, y = torch.randn(T, N, D), torch.randn(T, N, 1)
        structure = model_structure(model, x, y)
        inputs = CurvatureInputs(
            task_density(model, structure),
            {"theta": model.theta_init},
            torch.zeros(T, D),
            x,
            y,
            None,
            torch.full((D,), 0.5),
            False,
        )
        for name in ("ggn", "full"):
            estimate = build_curvature(name, inputs)
            H = estimate.to_dense()
            for j in range(T):  # one matrix at a time: outside the batched code path
                assert_close(
                    estimate.logdet()[j],
                    torch.linalg.eigvalsh(H[j]).log().sum(),
                    atol=1e-8,
                    rtol=1e-10,
                )
                rhs = torch.randn(D)
                assert_close(
                    estimate.solve(rhs.expand(T, D))[j],
                    torch.linalg.lstsq(H[j], rhs.unsqueeze(-1)).solution.squeeze(-1),
                    atol=1e-8,
                    rtol=1e-8,
                )
    finally:
        torch.set_num_threads(previous)


def test_registry_names_callables_and_errors() -> None:
    assert {"full", "ggn", "diag", "kfac", "fisher_diag"} <= set(available_curvatures())
    with pytest.raises(
        ValueError,
        match=r"unknown curvature 'exact'; registered: \['diag', 'fisher_diag', 'full', 'ggn', 'kfac'",
    ):
        get_curvature("exact")

    def prior_only(inputs: CurvatureInputs) -> CurvatureEstimate:
        return DiagonalCurvature(inputs.prior_precision_matrix())

    inputs = regression_inputs()
    assert_close(
        build_curvature(prior_only, inputs).logdet(), inputs.prior_precision_matrix().log().sum(-1)
    )
    register_curvature("prior_only_test", prior_only)
    try:
        assert "prior_only_test" in available_curvatures()
        with pytest.raises(ValueError, match="registered already"):
            register_curvature("prior_only_test", prior_only)
    finally:
        from hierbayes.inference.curvature import _REGISTRY

        _REGISTRY.pop("prior_only_test")
    with pytest.raises(TypeError, match="not a CurvatureEstimate"):
        build_curvature(lambda inputs: inputs.prior_precision, inputs)  # type: ignore[arg-type, return-value]


def test_kfac_needs_a_network_model() -> None:
    """K-FAC's Kronecker factors come from a network's layers; a plain program gets ggn, diag
    or full (the observation-site GGN is tested in test_observation_curvature.py)."""
    inputs = regression_inputs()
    generic = PyroTaskDensity(inputs.density.model, inputs.density.structure)  # type: ignore[attr-defined]
    with pytest.raises(ModelContractError, match="curvature='ggn', 'diag' or 'full'"):
        build_curvature(
            "kfac",
            CurvatureInputs(
                generic,
                inputs.params,
                inputs.phi,
                inputs.x,
                inputs.y,
                None,
                inputs.prior_precision,
                False,
            ),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        full = build_curvature(
            "full",
            CurvatureInputs(
                generic,
                inputs.params,
                inputs.phi,
                inputs.x,
                inputs.y,
                None,
                inputs.prior_precision,
                False,
            ),
        )
        native_full = build_curvature("full", inputs)
    assert_close(full.to_dense(), native_full.to_dense(), **TOL)


def test_per_task_noise_gets_its_fisher_information() -> None:
    """With a per-task log noise scale in phi, the GGN is block diagonal: the network block
    whitened by each task's own sigma, and 2 per observed value on the log-sigma entry."""
    batch = regression_batch(T=3, N=5)
    model = NeuralRegression(tiny_mlp(4), per_task_noise=True, per_task_noise_scale=0.3)
    structure = model_structure(model, batch.support_x, batch.support_y)
    density = task_density(model, structure)
    D = structure.num_params
    assert model.num_network_params + 1 == D
    phi = model.theta_init + 0.2 * torch.randn(3, D)
    P = density.prior_precision({"theta": model.theta_init})
    assert_close(P[-1], torch.tensor(1 / 0.09))
    inputs = CurvatureInputs(
        density, {"theta": model.theta_init}, phi, batch.support_x, batch.support_y, None, P, False
    )
    for name in ("ggn", "diag", "kfac"):
        H = build_curvature(name, inputs).to_dense()
        assert_close(H[:, -1, -1], (P[-1] + 2.0 * 5).expand(3))
        assert_close(H[:, -1, :-1], torch.zeros(3, D - 1))
    # the network block equals the GGN of a model with each task's sigma fixed
    sigma = phi[:, -1].exp()
    H = build_curvature("ggn", inputs).to_dense()
    phi_net = phi[:, :-1].clone().requires_grad_(True)
    f = model.net(phi_net, batch.support_x)
    J = torch.stack(
        [torch.autograd.grad(f[:, n, 0].sum(), phi_net, retain_graph=True)[0] for n in range(5)], 1
    )
    expected = J.transpose(1, 2) @ J / sigma[:, None, None] ** 2 + torch.diag_embed(
        P[:-1].expand(3, -1)
    )
    assert_close(H[:, :-1, :-1], expected, **TOL)


def test_eigenvalue_floor_is_differentiable_even_when_eigenvalues_repeat() -> None:
    from hierbayes.inference.curvature.full import clamp_eigenvalues

    torch.manual_seed(0)
    A = torch.randn(2, 5, 5)
    A = (A + A.transpose(1, 2)).requires_grad_(True)
    floor = torch.tensor([0.5, 1.0], requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, f: clamp_eigenvalues(0.5 * (a + a.transpose(1, 2)), f), (A, floor)
    )
    # several eigenvalues raised to one floor: eigh's own backward would divide by zero gaps
    B = (
        torch.diag(torch.tensor([-3.0, -2.0, -2.5, 0.0, 5.0, 7.0]))
        .unsqueeze(0)
        .requires_grad_(True)
    )
    out = torch.logdet(clamp_eigenvalues(B, torch.tensor([1.0]))[0])
    (grad,) = torch.autograd.grad(out, B)
    assert bool(torch.isfinite(grad).all())
    # d logdet / dB on the unclamped eigen-directions is 1/lambda, zero on the clamped ones
    assert_close(grad[0].diagonal(), torch.tensor([0.0, 0.0, 0.0, 0.0, 1 / 5, 1 / 7]))
