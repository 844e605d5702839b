"""The comparison: Gaussian 2-Wasserstein distances in closed form, table values against the
closed-form linear posterior and a NUTS reference, R-hat flagging, and the experiment."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

from hierbayes.experiments.compare import (
    CompareSettings,
    add_parser,
    exact_linear_posterior,
    linear_tasks,
    run,
    run_compare,
)
from hierbayes.inference.diagnostics.compare import (
    ReferenceNotConvergedWarning,
    compare_approximations,
)
from hierbayes.inference.diagnostics.wasserstein import symmetric_sqrt, wasserstein2_gaussian
from hierbayes.inference.posteriors import PointMassPosterior, TaskPosterior
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.references.meanfield import meanfield_vi
from hierbayes.inference.references.nuts import nuts_numpyro
from hierbayes.models import BayesianLinearRegression, model_structure

TOL = dict(atol=1e-10, rtol=1e-10)


def random_spd(D: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g)
    return A @ A.T / D + 0.2 * torch.eye(D)


# -- the 2-Wasserstein distance ----------------------------------------------------------------


def test_w2_one_dimensional_closed_form() -> None:
    r""":math:`W_2^2 = (\mu_1-\mu_2)^2 + (\sigma_1-\sigma_2)^2` in one dimension."""
    w2 = wasserstein2_gaussian(
        torch.tensor([0.3]), torch.tensor([[0.25]]), torch.tensor([-0.2]), torch.tensor([[1.69]])
    )
    torch.testing.assert_close(w2, torch.tensor(math.sqrt(0.5**2 + (0.5 - 1.3) ** 2)), **TOL)


def test_w2_of_identical_gaussians_is_zero() -> None:
    cov = random_spd(6, 0)
    mean = torch.randn(6)
    assert float(wasserstein2_gaussian(mean, cov, mean, cov)) < 1e-6


def test_w2_commuting_covariances() -> None:
    r"""Diagonal covariances commute:
    :math:`W_2^2 = |\Delta\mu|^2 + \sum_d(\sigma_{1d}-\sigma_{2d})^2`."""
    s1, s2 = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.5, 0.2, 2.0])
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    w2 = wasserstein2_gaussian(m1, torch.diag(s1**2), m2, torch.diag(s2**2))
    expected = math.sqrt(float((m1 - m2).square().sum() + (s1 - s2).square().sum()))
    torch.testing.assert_close(w2, torch.tensor(expected), **TOL)


def test_w2_general_against_scipy_sqrtm_and_symmetric() -> None:
    c1, c2 = random_spd(5, 1), random_spd(5, 2)
    m1, m2 = torch.randn(5), torch.randn(5)
    root = scipy.linalg.sqrtm(c2.numpy())
    cross = np.real(np.trace(scipy.linalg.sqrtm(root @ c1.numpy() @ root)))
    expected = float((m1 - m2).square().sum() + c1.trace() + c2.trace() - 2 * cross)
    w2 = wasserstein2_gaussian(m1, c1, m2, c2)
    torch.testing.assert_close(w2, torch.tensor(math.sqrt(expected)), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(wasserstein2_gaussian(m2, c2, m1, c1), w2, atol=1e-8, rtol=1e-8)


def test_w2_of_a_point_mass_is_its_distance_to_the_gaussian() -> None:
    cov = random_spd(4, 3)
    m1, m2 = torch.randn(4), torch.randn(4)
    expected = torch.sqrt((m1 - m2).square().sum() + cov.trace())
    torch.testing.assert_close(wasserstein2_gaussian(m1, None, m2, cov), expected, **TOL)
    torch.testing.assert_close(wasserstein2_gaussian(m2, cov, m1, None), expected, **TOL)
    zero = torch.zeros(4, 4)  # a zero covariance through the general formula agrees
    torch.testing.assert_close(wasserstein2_gaussian(m1, zero, m2, cov), expected, **TOL)


def test_symmetric_sqrt_squares_back_and_batches() -> None:
    cov = torch.stack([random_spd(4, 4), random_spd(4, 5)])
    root = symmetric_sqrt(cov)
    torch.testing.assert_close(root @ root, cov, **TOL)
    torch.testing.assert_close(root, root.transpose(-1, -2), **TOL)


# -- the table on the linear-Gaussian model ----------------------------------------------------


@pytest.fixture(scope="module")
def linear_case() -> dict[str, Any]:
    """Two linear tasks, the exact posterior and a converged NumPyro NUTS reference (float64)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tasks = linear_tasks(
            2,
            shots=5,
            query=10,
            input_dim=2,
            noise_scale=0.5,
            generator=torch.Generator().manual_seed(0),
        ).to(dtype=torch.float64)
        model = BayesianLinearRegression(2, bias=True, noise_scale=0.5)
        density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
        params = {"theta": torch.tensor([0.2, -0.1, 0.3])}
        exact = exact_linear_posterior(model, params, tasks, density=density)
        reference = nuts_numpyro(
            model, params, tasks, num_warmup=300, num_samples=500, num_chains=4, seed=0
        )
    finally:
        torch.set_default_dtype(default)
    assert reference.converged
    return dict(
        tasks=tasks, model=model, density=density, params=params, exact=exact, reference=reference
    )


def test_exact_row_agrees_with_nuts_within_monte_carlo_error(linear_case: dict[str, Any]) -> None:
    tasks, exact, reference = linear_case["tasks"], linear_case["exact"], linear_case["reference"]
    result = compare_approximations(
        {"exact": exact, "nuts_numpyro": reference},
        tasks,
        num_draws=250,
        predict_options={"exact": {"method": "linearized"}},
    )
    assert result.reference == "nuts_numpyro" and result.reference_flagged == []
    row, ref_row = result.table["exact"], result.table["nuts_numpyro"]
    # z = (mu_exact - mean of the NUTS draws) / sd: its Monte-Carlo s.e. is 1/sqrt(ESS)
    ess_min = reference.ess_bulk_min
    assert row["mean_error_sd_max"] < 4.5 / math.sqrt(ess_min)
    assert row["w2"] < 0.1 * math.sqrt(
        float(exact.covariance().diagonal(dim1=-2, dim2=-1).sum(-1).max())
    )
    assert ref_row["mean_error_sd"] == 0.0 and ref_row["w2"] < 1e-6
    assert ref_row["is_reference"] and not row["is_reference"]
    assert ref_row["rhat_max"] < 1.01 and ref_row["ess_bulk_min"] > 100
    # the same predictive distribution, to Monte-Carlo error of the mixture
    assert abs(row["lpd"] - ref_row["lpd"]) < 0.05
    for key in ("coverage_50", "coverage_90"):
        assert 0.0 <= row[key] <= 1.0
    assert row["elpd_se"] > 0 and abs(row["elpd_diff"]) < 3 * max(row["elpd_dse"], 0.2)
    assert row["num_draws"] == ref_row["num_draws"] == 1000  # 4 chains x 250 draws
    text = result.format()
    assert "exact" in text and "nuts_numpyro (ref)" in text
    plain = result.to_dict()
    json.dumps(plain, allow_nan=False)
    assert set(plain["approximations"]) == {"exact", "nuts_numpyro"}
    assert len(plain["approximations"]["exact"]["per_task"]["w2"]) == 2


def test_equal_gaussians_give_equal_rows(linear_case: dict[str, Any]) -> None:
    """Any posterior exposing the same mean and covariance() scores identically (common random
    numbers); on the linear model the Laplace posterior at the mode is the exact posterior."""
    tasks, exact, reference = linear_case["tasks"], linear_case["exact"], linear_case["reference"]

    class CovarianceOnly(TaskPosterior):
        def covariance(self) -> Tensor:
            return exact.covariance()

        def predict(self, x: Tensor, **kwargs: object) -> Any:
            return exact.predict(x, method="linearized")

    twin = CovarianceOnly(exact.density, exact.params, exact.mean)
    result = compare_approximations(
        {"exact": exact, "twin": twin, "nuts_numpyro": reference},
        tasks,
        num_draws=100,
        predict_options={"exact": {"method": "linearized"}},
    )
    assert_rows_equal(result.table["exact"], result.table["twin"])


def test_laplace_row_equals_exact_row(linear_case: dict[str, Any]) -> None:
    laplace = pytest.importorskip("hierbayes.inference.posteriors.laplace")
    tasks, exact, reference = linear_case["tasks"], linear_case["exact"], linear_case["reference"]
    posterior = laplace.laplace_posterior(
        linear_case["density"],
        linear_case["params"],
        exact.mean,
        tasks.support_x,
        tasks.support_y,
        curvature="ggn",
    )
    result = compare_approximations(
        {"exact": exact, "laplace_ggn": posterior, "nuts_numpyro": reference},
        tasks,
        num_draws=100,
        predict_options={"exact": {"method": "linearized"}},
    )
    assert_rows_equal(result.table["exact"], result.table["laplace_ggn"])


def assert_rows_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key, value in a.items():
        if key in ("wall_time", "elpd_rank", "stacking_weight", "elpd_diff", "elpd_dse"):
            continue  # ties: az.compare orders and weighs equal rows arbitrarily
        if isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=1e-8, abs=1e-8), key
        else:
            assert b[key] == value, key


def test_point_mass_row(linear_case: dict[str, Any]) -> None:
    tasks, exact, reference = linear_case["tasks"], linear_case["exact"], linear_case["reference"]
    shift = 0.3 * exact.covariance().diagonal(dim1=-2, dim2=-1).sqrt()
    point = PointMassPosterior(exact.density, exact.params, exact.mean + shift)
    result = compare_approximations({"maml": point, "nuts_numpyro": reference}, tasks, num_draws=50)
    row = result.table["maml"]
    ref_cov = reference.draws.reshape(-1, *exact.mean.shape)
    ref_mean = ref_cov.mean(0)
    centred = ref_cov - ref_mean
    cov = torch.einsum("std,ste->tde", centred, centred) / centred.shape[0]
    expected = torch.sqrt(
        (point.mean - ref_mean).square().sum(-1) + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    )
    assert row["w2"] == pytest.approx(float(expected.mean()), rel=1e-8)
    assert row["mean_error_sd"] == pytest.approx(0.3, abs=4.5 / math.sqrt(reference.ess_bulk_min))
    assert row["elpd_diff"] > 0  # a point mass predicts worse than the posterior here


def test_meanfield_vi_finds_the_mean_and_the_diagonal_precision(
    linear_case: dict[str, Any],
) -> None:
    r"""For :math:`\mathcal N(\mu, H^{-1})` the best mean-field Gaussian has mean :math:`\mu` and
    variances :math:`1/H_{dd}`."""
    exact = linear_case["exact"]
    q = meanfield_vi(
        linear_case["model"], linear_case["params"], linear_case["tasks"], num_steps=1500, seed=0
    )
    sd = exact.covariance().diagonal(dim1=-2, dim2=-1).sqrt()
    assert float(((q.mean - exact.mean) / sd).abs().max()) < 0.1
    optimal = torch.linalg.inv(exact.covariance()).diagonal(dim1=-2, dim2=-1).rsqrt()
    torch.testing.assert_close(q.scale, optimal, rtol=0.1, atol=0)
    assert q.wall_time > 0 and len(q.elbo) == 1500
    import pyro

    assert len(pyro.get_param_store()) == 0  # the run left no parameters behind


def test_flagged_reference_warns_and_is_reported(linear_case: dict[str, Any]) -> None:
    tasks, exact = linear_case["tasks"], linear_case["exact"]
    draws = exact.sample(400, generator=torch.Generator().manual_seed(0)).reshape(4, 100, 2, 3)
    draws[2:, :, 1] += 1.0  # task 1: chains disagree
    bad = SamplePosterior(exact.density, exact.params, draws, engine="test")
    with pytest.warns(ReferenceNotConvergedWarning, match=r"task\(s\) \[1\]"):
        result = compare_approximations({"exact": exact, "nuts_pyro": bad}, tasks, num_draws=50)
    assert result.reference == "nuts_pyro"  # the default falls back to Pyro's NUTS
    assert result.reference_flagged == [1]
    assert result.table["nuts_pyro"]["flagged"] == [1]
    assert "WARNING" in result.format()
    assert result.to_dict()["reference_flagged"] == [1]


def test_reference_choice(linear_case: dict[str, Any]) -> None:
    tasks, exact = linear_case["tasks"], linear_case["exact"]
    result = compare_approximations({"exact": exact}, tasks, num_draws=20)
    assert result.reference is None and result.table["exact"]["w2"] is None
    result = compare_approximations({"exact": exact}, tasks, reference="exact", num_draws=20)
    assert result.table["exact"]["w2"] < 1e-6
    with pytest.raises(KeyError, match="nuts_pyro"):
        compare_approximations({"exact": exact}, tasks, reference="nuts_pyro")


# -- the experiment ------------------------------------------------------------------------------


@pytest.mark.filterwarnings(
    "ignore::hierbayes.inference.diagnostics.compare.ReferenceNotConvergedWarning"
)
def test_compare_experiment_linear_quick(tmp_path: Path) -> None:
    report = run_compare(CompareSettings.quick(), tmp_path, problems=("linear",))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = metrics["linear"]["approximations"]
    assert list(rows) == [
        "maml",
        "laplace_ggn",
        "laplace_kfac",
        "laplace_diag",
        "laplace_full",
        "meanfield_vi",
        "nuts_pyro",
        "nuts_numpyro",
        "exact",
    ]
    assert metrics["linear"]["reference"] == "nuts_numpyro"
    # Laplace at the mode with the exact GGN (or Hessian) is the exact posterior of this model
    for name in ("laplace_ggn", "laplace_full"):
        for key in ("w2", "mean_error_sd", "lpd", "coverage_90"):
            assert rows[name][key] == pytest.approx(rows["exact"][key], rel=1e-6, abs=1e-9), (
                name,
                key,
            )
    for name, row in rows.items():
        for key in (
            "lpd",
            "elpd",
            "elpd_se",
            "coverage_50",
            "coverage_90",
            "mean_error_sd",
            "w2",
            "wall_time",
        ):
            assert key in row, (name, key)
        for figure in row["figures"].values():
            assert Path(figure).exists()
    assert rows["maml"]["w2"] > rows["exact"]["w2"]
    assert "linear" in report["_tables"]


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore::hierbayes.inference.diagnostics.compare.ReferenceNotConvergedWarning"
)
def test_compare_command_quick(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--quick", "--out", str(tmp_path), "--no-progress"])
    report = run(args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["sinusoid"]["approximations"]) == {
        "maml",
        "laplace_ggn",
        "laplace_kfac",
        "laplace_diag",
        "meanfield_vi",
        "nuts_pyro",
        "nuts_numpyro",
    }
    assert "exact" in metrics["linear"]["approximations"]
    assert report["sinusoid"]["approximations"]["maml"]["figures"]["forest"].endswith(".png")


# -- Gaussian posteriors: sampling from a generator, the linearised predictive -------------------


def gaussian_posteriors(per_task_noise: bool = False):  # type: ignore[no-untyped-def]
    """A tanh network's density, and a dense and a mean-field Gaussian posterior of 3 tasks."""
    from hierbayes.inference.posteriors.gaussian import GaussianPosterior
    from hierbayes.inference.references.meanfield import MeanFieldPosterior
    from hierbayes.models import GaussianLikelihood, TaskModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = TaskModel(net, GaussianLikelihood(0.3, per_task=per_task_noise))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 1, generator=g)
    y = torch.randn(3, 9, 1, generator=g)
    density = model.task_density(model_structure(model, x[:, :5], y[:, :5]))
    D = model.num_params
    mean = model.theta_init + 0.2 * torch.randn(3, D, generator=g)
    A = torch.randn(3, D, D, generator=g)
    cov = 0.05 * (A @ A.transpose(1, 2) / D + 0.1 * torch.eye(D))
    params = dict(model.initial_values())
    dense = GaussianPosterior(density, params, mean, cov)
    scale = 0.1 + torch.rand(3, D, generator=g)
    meanfield = MeanFieldPosterior(density, params, mean, scale)
    return density, params, x[:, 5:], dense, meanfield


@pytest.mark.parametrize("kind", ["dense", "meanfield"])
def test_gaussian_posteriors_draw_from_the_generator_given(kind: str) -> None:
    *_, dense, meanfield = gaussian_posteriors()
    posterior = dense if kind == "dense" else meanfield
    state = torch.random.get_rng_state()
    a = posterior.sample(25, generator=torch.Generator().manual_seed(5))
    b = posterior.sample(25, generator=torch.Generator().manual_seed(5))
    c = posterior.sample(25, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == (25, *posterior.mean.shape) and a.dtype == posterior.mean.dtype
    # the draws are mean + L z with z standard normal from that generator
    z = torch.randn((25, *posterior.mean.shape), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, posterior.transform_noise(z), rtol=0, atol=0)
    # the sampled predictive is reproducible from a generator too
    x = torch.randn(3, 4, 1)
    p1 = posterior.predict(x, num_samples=10, generator=torch.Generator().manual_seed(2))
    p2 = posterior.predict(x, num_samples=10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(p1.mean, p2.mean, rtol=0, atol=0)


@pytest.mark.gpu
def test_gaussian_posteriors_draw_on_their_device() -> None:
    from hierbayes.inference.posteriors.gaussian import GaussianPosterior

    density, params, _, dense, _ = gaussian_posteriors()
    device = torch.device("cuda")
    posterior = GaussianPosterior(
        density, params, dense.mean.to(device), dense.covariance().to(device)
    )
    draws = posterior.sample(8, generator=torch.Generator(device=device).manual_seed(0))
    assert draws.device.type == "cuda"


def autograd_linearized_variance(density: Any, params: Any, mean: Tensor, x: Tensor, cov: Tensor):  # type: ignore[no-untyped-def]
    r"""diag(J Σ Jᵀ) task by task, J by ``torch.autograd.functional.jacobian`` of the network
    outputs: the loop the vectorised predictive replaced."""
    out = []
    for t in range(mean.shape[0]):

        def f(phi: Tensor, t: int = t) -> Tensor:
            return density.outputs(params, phi[None], x[t : t + 1]).reshape(-1)

        J = torch.autograd.functional.jacobian(f, mean[t])
        out.append(torch.einsum("rd,de,re->r", J, cov[t], J))
    return torch.stack(out)


@pytest.mark.parametrize("per_task_noise", [False, True])
def test_linearized_predictive_matches_per_task_autograd(per_task_noise: bool) -> None:
    density, params, x, dense, meanfield = gaussian_posteriors(per_task_noise)
    for posterior in (dense, meanfield):
        prediction = posterior.predict(x, method="linearized")
        cov = posterior.covariance()
        expected = autograd_linearized_variance(density, params, posterior.mean, x, cov)
        noise = density.predictive(params, posterior.mean, x).variance  # (T, M) or (T, M, 1)
        torch.testing.assert_close(
            prediction.variance.reshape(3, -1),
            expected + noise.reshape(3, -1),
            rtol=1e-10,
            atol=1e-12,
        )
        torch.testing.assert_close(
            prediction.mean, density.outputs(params, posterior.mean, x), rtol=1e-12, atol=1e-12
        )


def test_linearized_predictive_needs_a_network() -> None:
    from hierbayes.errors import ModelContractError
    from hierbayes.inference.posteriors.gaussian import GaussianPosterior
    from hierbayes.models import PyroTaskDensity
    from tests.test_nuts import linear_problem, linear_program

    tasks, _, params, mean, cov = linear_problem(T=2)
    structure = model_structure(linear_program, tasks.support_x, tasks.support_y)
    density = PyroTaskDensity(linear_program, structure)
    posterior = GaussianPosterior(density, params, mean, cov)
    with pytest.raises(ModelContractError, match="sampled"):
        posterior.predict(tasks.query_x, method="linearized")
    sampled = posterior.predict(tasks.query_x, num_samples=50)  # sampling needs no network
    assert sampled.mean.shape == (2, 4, 1)
