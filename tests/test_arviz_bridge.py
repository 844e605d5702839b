"""The ArviZ bridge: groups, dims and coords of the InferenceData, its values, ELPD, figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hierbayes.inference.diagnostics.arviz_bridge import (
    compare_elpd,
    convergence_diagnostics,
    heldout_pointwise,
    parameter_names,
    plot_forest,
    plot_posterior,
    to_inference_data,
)
from hierbayes.inference.diagnostics.readout import posterior_draws
from hierbayes.inference.posteriors import PointMassPosterior
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.gaussian import GaussianPosterior
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.models import (
    BayesianLinearRegression,
    GaussianLikelihood,
    TaskModel,
    model_structure,
)
from hierbayes.tasks import TaskBatch


def linear_setup(T: int = 3, N: int = 5, M: int = 4, *, task_ids: bool = True):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, N + M, 2, generator=g)
    y = torch.randn(T, N + M, 1, generator=g)
    ids = torch.tensor([11, 7, 3])[:T] if task_ids else None
    tasks = TaskBatch(x[:, :N], y[:, :N], x[:, N:], y[:, N:], task_ids=ids)
    model = BayesianLinearRegression(2, bias=True, noise_scale=0.5)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    params = {"theta": torch.tensor([0.1, -0.2, 0.3])}
    mean = torch.randn(T, 3, generator=g)
    A = torch.randn(T, 3, 3, generator=g)
    cov = A @ A.transpose(1, 2) / 3 + 0.1 * torch.eye(3)
    return tasks, density, params, mean, cov


def test_groups_dims_and_coords() -> None:
    tasks, density, params, mean, cov = linear_setup()
    posterior = GaussianPosterior(density, params, mean, cov)
    idata = to_inference_data(posterior, tasks, num_draws=50, num_chains=3, seed=1, name="g")
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "heldout_log_likelihood",
        "observed_data",
        "constant_data",
    }
    phi = idata.posterior["phi"]
    assert phi.dims == ("chain", "draw", "task", "parameter")
    assert phi.shape == (3, 50, 3, 3)
    assert list(idata.posterior["task"].values) == [11, 7, 3]
    assert list(idata.posterior["parameter"].values) == ["weight[0,0]", "weight[0,1]", "bias[0]"]
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "task", "point")
    assert idata.posterior_predictive["y"].shape == (3, 50, 3, 4)
    assert idata.heldout_log_likelihood["y"].dims == ("chain", "draw", "task", "point")
    assert idata.observed_data["y"].dims == ("task", "point")
    np.testing.assert_allclose(idata.observed_data["y"].values, tasks.query_y[..., 0].numpy())
    # theta is recorded with the parameter coordinate, the query inputs beside it
    assert idata.constant_data["theta"].dims == ("parameter",)
    np.testing.assert_allclose(idata.constant_data["theta"].values, params["theta"].numpy())
    assert idata.constant_data["x"].dims == ("task", "point", "input")
    assert idata.posterior.attrs["approximation"] == "g"


def test_log_likelihood_is_the_pointwise_query_density_at_each_draw() -> None:
    tasks, density, params, mean, cov = linear_setup()
    posterior = GaussianPosterior(density, params, mean, cov)
    idata = to_inference_data(posterior, tasks, num_draws=20, num_chains=2, seed=0)
    phi = torch.tensor(np.array(idata.posterior["phi"].values))  # (2, 20, T, D)
    c, s = 1, 7
    f = (tasks.query_x * phi[c, s, :, None, :2]).sum(-1) + phi[c, s, :, None, 2]
    expected = torch.distributions.Normal(f, 0.5).log_prob(tasks.query_y[..., 0])
    np.testing.assert_allclose(
        idata.heldout_log_likelihood["y"].values[c, s], expected.numpy(), rtol=1e-12
    )


def test_gaussian_draws_use_common_random_numbers() -> None:
    """Equal Gaussians give equal draws, whatever their class (Laplace exposes covariance())."""
    _, density, params, mean, cov = linear_setup()

    class CovarianceOnly(TaskPosterior):
        def covariance(self) -> Tensor:
            return cov

    a = posterior_draws(GaussianPosterior(density, params, mean, cov), 2, 10, seed=3)
    b = posterior_draws(CovarianceOnly(density, params, mean), 2, 10, seed=3)
    torch.testing.assert_close(a, b)
    draws = posterior_draws(GaussianPosterior(density, params, mean, cov), 4, 5000, seed=0)
    flat = draws.reshape(-1, 3, 3)
    torch.testing.assert_close(flat.mean(0), mean, atol=0.05, rtol=0)
    centred = flat - flat.mean(0)
    torch.testing.assert_close(
        torch.einsum("std,ste->tde", centred, centred) / flat.shape[0], cov, atol=0.05, rtol=0
    )


def test_mcmc_keeps_its_chains_and_sample_stats() -> None:
    tasks, density, params, _, _ = linear_setup(task_ids=False)
    draws = torch.randn(4, 100, 3, 3, generator=torch.Generator().manual_seed(0))
    diverging = torch.zeros(4, 100, 3, dtype=torch.bool)
    diverging[1, 20, 2] = True
    posterior = SamplePosterior(density, params, draws, sampler_stats={"diverging": diverging})
    idata = to_inference_data(posterior, tasks, num_draws=100, num_chains=2)
    assert idata.posterior["phi"].shape == (4, 100, 3, 3)
    np.testing.assert_array_equal(idata.posterior["phi"].values, draws.numpy())
    assert list(idata.posterior["task"].values) == [0, 1, 2]
    assert idata.sample_stats["diverging"].dims == ("chain", "draw", "task")
    assert int(idata.sample_stats["diverging"].values.sum()) == 1
    thinned = to_inference_data(posterior, tasks, num_draws=25)
    assert thinned.posterior["phi"].shape == (4, 25, 3, 3)


def test_point_mass_and_multi_output_targets() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 2))
    model = TaskModel(net, GaussianLikelihood(0.3, learned=False))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 1, generator=g)
    y = torch.randn(2, 8, 2, generator=g)
    tasks = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    phi = model.theta_init.expand(2, -1)
    idata = to_inference_data(PointMassPosterior(density, {}, phi), tasks, num_draws=10)
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "task", "point", "output")
    assert idata.observed_data["y"].dims == ("task", "point", "output")
    assert idata.heldout_log_likelihood["y"].dims == ("chain", "draw", "task", "point")
    names = list(idata.posterior["parameter"].values)
    assert names[:2] == ["0.weight[0,0]", "0.weight[1,0]"] and names[-1] == "2.bias[1]"
    assert len(names) == model.num_params == len(set(names))
    # every draw of a point mass is the same
    values = idata.posterior["phi"].values
    np.testing.assert_array_equal(values, np.broadcast_to(phi.numpy(), values.shape))


def test_parameter_names_fall_back_to_indices() -> None:
    assert parameter_names(object(), 3) == ["phi[0]", "phi[1]", "phi[2]"]


def test_query_sets_of_unequal_sizes_are_flattened_to_their_real_points() -> None:
    tasks, density, params, mean, cov = linear_setup()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, -1] = False
    masked = TaskBatch(
        tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, query_mask=mask
    )
    posterior = GaussianPosterior(density, params, mean, cov)
    flat = to_inference_data(posterior, masked, num_draws=20)
    full = to_inference_data(posterior, tasks, num_draws=20)
    ll = flat["heldout_log_likelihood"]["y"]
    assert ll.dims == ("chain", "draw", "observation") and ll.shape[-1] == 11
    # the same draws (common random numbers): the real points of the (task, point) layout
    expected = full["heldout_log_likelihood"]["y"].values[..., mask.numpy()]
    np.testing.assert_allclose(ll.values, expected, rtol=1e-12)
    assert list(flat["heldout_log_likelihood"]["observation_task"].values[:3]) == [0, 0, 0]


def test_heldout_elpd_and_compare() -> None:
    tasks, density, params, mean, cov = linear_setup()
    good = to_inference_data(GaussianPosterior(density, params, mean, cov), tasks, num_draws=40)
    ll = good.heldout_log_likelihood["y"].values.reshape(-1, 12)
    expected = np.log(np.mean(np.exp(ll), axis=0))
    np.testing.assert_allclose(heldout_pointwise(good), expected, rtol=1e-12)
    pointwise = {"a": expected, "b": expected - 0.5, "c": expected - 0.1}
    table = compare_elpd(pointwise)
    assert [table[n]["rank"] for n in "acb"] == [0, 1, 2]
    assert table["a"]["elpd"] == pytest.approx(expected.sum())
    assert table["a"]["se"] == pytest.approx(math.sqrt(12 * expected.var()))
    assert table["b"]["elpd_diff"] == pytest.approx(6.0)
    assert table["b"]["dse"] == pytest.approx(0.0, abs=1e-9)  # a constant shift
    assert sum(row["weight"] for row in table.values()) == pytest.approx(1.0)
    assert compare_elpd({"only": expected})["only"]["weight"] == 1.0


def test_convergence_diagnostics_of_independent_draws() -> None:
    draws = np.random.default_rng(0).normal(size=(4, 500, 2, 3))
    found = convergence_diagnostics(draws)
    assert found["rhat"].shape == (2, 3) and found["ess_bulk"].shape == (2, 3)
    assert found["rhat"].dtype == torch.float64
    assert float((found["rhat"] - 1).abs().max()) < 0.01
    assert float(found["ess_bulk"].min()) > 1200  # 2000 independent draws
    # a tensor of draws gives the same values as its array
    again = convergence_diagnostics(torch.from_numpy(draws))
    for key, value in found.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)


def test_figures_are_written(tmp_path: Path) -> None:
    tasks, density, params, mean, cov = linear_setup()
    gauss = to_inference_data(GaussianPosterior(density, params, mean, cov), tasks, num_draws=30)
    point = to_inference_data(PointMassPosterior(density, params, mean), tasks, num_draws=30)
    forest = plot_forest({"gauss": gauss, "point": point}, tmp_path / "forest.png", task=7)
    on_ref = plot_posterior(point, tmp_path / "point.png", reference=gauss)
    alone = plot_posterior(point, tmp_path / "alone.png", parameters=["bias[0]"])
    own = plot_posterior(gauss, tmp_path / "gauss.png", task=3, reference=gauss)
    for path in (forest, on_ref, alone, own):
        assert path.exists() and path.stat().st_size > 5000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arviz_is_imported_by_the_bridge_only() -> None:
    """House style: only the bridge package imports ArviZ; the rest reach it through the bridge,
    lazily."""
    root = Path(__file__).resolve().parents[1] / "hierbayes"
    importers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if any(
            line.strip().startswith(("import arviz", "from arviz"))
            for line in path.read_text().splitlines()
        )
    )
    assert importers == [
        "inference/diagnostics/arviz_bridge/diagnostics.py",
        "inference/diagnostics/arviz_bridge/elpd.py",
        "inference/diagnostics/arviz_bridge/figures.py",
        "inference/diagnostics/arviz_bridge/inference_data.py",
    ]


def test_per_task_noise_draws_predict_and_name_the_noise_entry() -> None:
    """A per-task noise scale in phi: the predictive mixes components of different widths."""
    from hierbayes.inference.posteriors.mixture import PerDrawNoiseMixture

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    model = TaskModel(net, GaussianLikelihood(0.5, per_task=True))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 9, 1, generator=g), torch.randn(2, 9, 1, generator=g)
    tasks = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    draws = model.theta_init + 0.3 * torch.randn(2, 40, 2, model.num_params, generator=g)
    posterior = SamplePosterior(density, dict(model.initial_values()), draws)
    prediction = posterior.predict(tasks.query_x)
    assert isinstance(prediction, PerDrawNoiseMixture)
    sigma2 = draws[..., -1].exp().square().reshape(80, 2, 1, 1)
    expected = prediction.component_means.var(0, unbiased=False) + sigma2.mean(0)
    torch.testing.assert_close(prediction.variance, expected)
    lower, upper = prediction.interval(0.9)
    assert bool((lower < prediction.mean).all() and (prediction.mean < upper).all())
    idata = to_inference_data(posterior, tasks, num_draws=40)
    assert list(idata.posterior["parameter"].values)[-1] == "log_noise_scale"


def test_posterior_draws_are_seeded_and_leave_the_global_generator_alone() -> None:
    _, density, params, mean, cov = linear_setup()
    posterior = GaussianPosterior(density, params, mean, cov)
    state = torch.random.get_rng_state()
    a = posterior_draws(posterior, 2, 10, seed=3)
    b = posterior_draws(posterior, 2, 10, seed=3)
    c = posterior_draws(posterior, 2, 10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # the same draws as the posterior's own sampler with a generator seeded alike
    own = posterior.sample(20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.reshape(20, 3, 3), own, rtol=0, atol=0)


def test_layers_import_one_way() -> None:
    """Posteriors import neither the evaluation nor the reference methods; the evaluation does
    not import the reference methods; and no module of these layers imports another private
    module of ArviZ or Pyro (``arviz.stats.stats_utils`` and the like)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "hierbayes" / "inference"
    forbidden = {
        "posteriors": ("hierbayes.inference.diagnostics", "hierbayes.inference.references"),
        "evaluation": ("hierbayes.inference.references",),
    }
    for layer, banned in forbidden.items():
        for path in (root / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith(banned), (path.name, node.module)
    for layer in ("posteriors", "evaluation", "reference"):
        for path in (root / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith("arviz."), (path.name, node.module)
                    private = any(part.startswith("_") for part in node.module.split("."))
                    assert not (node.module.startswith("pyro") and private), node.module


def test_variables_are_named_after_the_sites_and_az_loo_refuses_heldout_points() -> None:
    """repro_11: a plain program's site names and integer parameter coordinates; the held-out
    log likelihood is not where az.loo would treat it as in-sample."""
    import arviz as az
    import pyro
    import pyro.distributions as dist

    from hierbayes.inference import fit
    from hierbayes.inference.diagnostics import observed_variable, posterior_variable
    from tests.helpers import regression_batch

    def line(x, y=None):  # type: ignore[no-untyped-def]
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            w = pyro.sample("w", dist.Normal(mu, 1.0).to_event(1))
            with pyro.plate("data", x.shape[1], dim=-1):
                mean = w[..., 0] * x[..., 0] + w[..., 1]
                pyro.sample("obs", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])

    tasks = regression_batch(T=3, N=5, M=4)
    result = fit(line, tasks, meta_steps=3, step_size=0.01, progress=False)
    idata = to_inference_data(result.adapt(tasks), tasks, num_draws=10, num_chains=2)
    assert posterior_variable(idata) == "w" and observed_variable(idata) == "obs"
    assert list(idata.posterior["w"].coords["parameter"].values) == [0, 1]
    assert set(idata.heldout_log_likelihood.data_vars) == {"obs"}
    assert "log_likelihood" not in idata.groups()
    with pytest.raises(TypeError, match="log likelihood"):
        az.loo(idata)
