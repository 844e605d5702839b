"""NUTS references: both engines recover the closed-form linear-Gaussian posterior within
Monte-Carlo error (ESS-based standard errors), run any Pyro program, and flag R-hat > 1.01."""

from __future__ import annotations

import math
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor

from hierbayes.inference.diagnostics.arviz_bridge import convergence_diagnostics
from hierbayes.inference.posteriors import MixturePrediction
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.references.nuts import initial_points, nuts_numpyro, nuts_pyro
from hierbayes.models import BayesianLinearRegression, model_structure
from hierbayes.tasks import TaskBatch

SIGMA, PRIOR_SCALE = 0.5, 1.0


def linear_problem(T: int = 2, N: int = 5, d: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    """Tasks, model, globals and the exact posterior N(mu, Sigma) (written out here, MATH.md §3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N + 4, d, generator=g)
    w = torch.randn(T, d + 1, generator=g)
    f = (x * w[:, None, :d]).sum(-1, keepdim=True) + w[:, None, d:]
    y = f + SIGMA * torch.randn(f.shape, generator=g)
    tasks = TaskBatch(x[:, :N], y[:, :N], x[:, N:], y[:, N:])
    model = BayesianLinearRegression(d, bias=True, noise_scale=SIGMA, prior_scale=PRIOR_SCALE)
    theta = torch.tensor([0.4, -0.3, 0.2])[: d + 1]
    params = {"theta": theta}
    X = torch.cat([tasks.support_x, torch.ones(T, N, 1)], -1)
    H = X.transpose(1, 2) @ X / SIGMA**2 + torch.eye(d + 1) / PRIOR_SCALE**2
    cov = torch.linalg.inv(H)
    mean = (
        cov @ (X.transpose(1, 2) @ tasks.support_y / SIGMA**2 + theta[:, None] / PRIOR_SCALE**2)
    )[..., 0]
    return tasks, model, params, mean, cov


def assert_recovers(posterior: SamplePosterior, mean: Tensor, cov: Tensor, z: float = 4.5) -> None:
    r"""Mean within ``z`` Monte-Carlo standard errors :math:`\sigma_d/\sqrt{ESS_d}`; the whitened
    sample covariance :math:`\Sigma^{-1/2}\hat\Sigma\Sigma^{-1/2}` within ``z·sqrt(2/ESS)`` of I."""
    ess = posterior.diagnostics()["ess_bulk"]  # (T, D)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    draws = posterior.draws.reshape(-1, *mean.shape)
    error = (draws.mean(0) - mean) / (sd / ess.sqrt())
    assert error.abs().max() < z, f"posterior mean off by {error.abs().max():.2f} MC s.e."
    evals, evecs = torch.linalg.eigh(cov)
    inv_root = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(-1, -2)
    centred = draws - draws.mean(0)
    sample_cov = torch.einsum("std,ste->tde", centred, centred) / draws.shape[0]
    whitened = inv_root @ sample_cov @ inv_root
    eye = torch.eye(mean.shape[-1]).expand_as(whitened)
    tolerance = z * math.sqrt(2.0 / float(ess.min()))
    assert (whitened - eye).abs().max() < tolerance, (whitened - eye).abs().max()


def test_numpyro_recovers_closed_form_linear_posterior() -> None:
    tasks, model, params, mean, cov = linear_problem(T=2)
    posterior = nuts_numpyro(
        model, params, tasks, num_warmup=300, num_samples=500, num_chains=4, seed=1
    )
    assert posterior.draws.shape == (4, 500, 2, 3)
    assert posterior.draws.dtype == torch.float64
    assert posterior.settings["x64"] is True
    assert posterior.converged, posterior.summary()["rhat_max"]
    assert_recovers(posterior, mean, cov)
    summary = posterior.summary()
    assert summary["engine"] == "numpyro" and summary["divergences"] == [0, 0]
    assert summary["ess_bulk_min_per_second"] > 0


def test_pyro_recovers_closed_form_linear_posterior() -> None:
    tasks, model, params, mean, cov = linear_problem(T=1, seed=2)
    posterior = nuts_pyro(
        model, params, tasks, num_warmup=150, num_samples=300, num_chains=2, seed=0
    )
    assert posterior.draws.shape == (2, 300, 1, 3)
    assert posterior.engine == "pyro" and posterior.settings["potential_evaluations"] > 0
    assert_recovers(posterior, mean, cov)


def test_pyro_runs_any_pyro_program() -> None:
    """A hand-written Pyro program (no native density): PyroTaskDensity gives the potential."""
    tasks, _, params, mean, cov = linear_problem(T=1, seed=3)

    def program(x: Tensor, y: Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 10.0).to_event(1))
        T, N = x.shape[:2]
        with pyro.plate("tasks", T, dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, PRIOR_SCALE).to_event(1))
            f = (x * phi[..., :2]).sum(-1) + phi[..., 2]
            with pyro.plate("data", N, dim=-1):
                pyro.sample("y", dist.Normal(f, SIGMA), obs=None if y is None else y[..., 0])

    posterior = nuts_pyro(
        program, params, tasks, num_warmup=100, num_samples=150, num_chains=2, seed=0
    )
    assert posterior.draws.shape == (2, 150, 1, 3)
    assert_recovers(posterior, mean, cov, z=5.0)
    with pytest.raises(TypeError, match="nuts_pyro"):
        nuts_numpyro(program, params, tasks, num_samples=10)


def test_both_engines_start_from_the_same_dispersed_points() -> None:
    tasks, model, params, _, _ = linear_problem(T=2)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    a = initial_points(density, params, tasks, 3, seed=5, init_radius=0.5)
    b = initial_points(density, params, tasks, 3, seed=5, init_radius=0.5)
    assert a.shape == (3, 2, 3)
    torch.testing.assert_close(a, b)
    assert bool(((a - params["theta"]).abs() <= 0.5).all())
    assert float((a[0] - a[1]).abs().max()) > 0  # chains start apart


def test_rhat_flags_chains_that_disagree() -> None:
    tasks, model, params, _, _ = linear_problem(T=3)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(4, 200, 3, 3, generator=g)
    draws[2:, :, 1, 0] += 3.0  # task 1: two chains elsewhere
    draws[:, :, 2, 2] = 0.7  # task 2: constant chains, R-hat undefined
    posterior = SamplePosterior(
        density, params, draws, engine="test", diagnostics=convergence_diagnostics(draws)
    )
    rhat = posterior.rhat_max_per_task
    assert float(rhat[0]) < 1.01
    assert float(rhat[1]) > 1.5
    assert math.isnan(float(rhat[2]))
    assert posterior.flagged == [1, 2]
    assert not posterior.converged
    assert posterior.summary()["flagged"] == [1, 2]


def test_sample_posterior_draws_and_predicts() -> None:
    tasks, model, params, _, _ = linear_problem(T=2)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    draws = torch.randn(2, 50, 2, 3, generator=torch.Generator().manual_seed(1))
    posterior = SamplePosterior(density, params, draws)
    torch.testing.assert_close(posterior.mean, draws.mean(dim=(0, 1)))
    picked = posterior.sample(30, generator=torch.Generator().manual_seed(0))
    assert picked.shape == (30, 2, 3)
    assert posterior.sample(500).shape == (500, 2, 3)  # more than held: with replacement
    prediction = posterior.predict(tasks.query_x)
    assert isinstance(prediction, MixturePrediction)
    assert prediction.component_means.shape == (100, 2, 4, 1)
    # mixture mean = mean of the network outputs at the draws
    X = torch.cat([tasks.query_x, torch.ones(2, 4, 1)], -1)
    expected = torch.einsum("tmd,cstd->tm", X, draws) / 100
    torch.testing.assert_close(prediction.mean[..., 0], expected)


def test_jax_and_arviz_stay_optional_at_import() -> None:
    """Importing the NUTS, comparison and VI modules loads neither JAX nor ArviZ."""
    code = (
        "import sys\n"
        "import hierbayes.inference.references.nuts, hierbayes.inference.diagnostics.compare\n"
        "import hierbayes.inference.references.meanfield, hierbayes.experiments.compare\n"
        "print(sorted(m for m in ('jax', 'numpyro', 'arviz') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_sample_posterior_without_diagnostics_says_how_to_get_them() -> None:
    tasks, model, params, _, _ = linear_problem(T=2)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    draws = torch.randn(2, 40, 2, 3, generator=torch.Generator().manual_seed(4))
    bare = SamplePosterior(density, params, draws, engine="test")
    assert not bare.has_diagnostics
    with pytest.raises(ValueError, match="convergence_diagnostics"):
        _ = bare.flagged
    found = convergence_diagnostics(draws)
    posterior = bare.with_diagnostics(found)
    assert posterior.has_diagnostics and posterior.engine == "test"
    torch.testing.assert_close(posterior.diagnostics()["rhat"], found["rhat"])
    with pytest.raises(ValueError, match=r"\(tasks, parameters\)"):
        bare.with_diagnostics({k: v[:1] for k, v in found.items()})


@pytest.mark.parametrize("num_samples", [30, 500])  # without and with replacement
def test_sample_posterior_draws_from_the_generator_given(num_samples: int) -> None:
    tasks, model, params, _, _ = linear_problem(T=2)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    draws = torch.randn(2, 50, 2, 3, generator=torch.Generator().manual_seed(1))
    posterior = SamplePosterior(density, params, draws)
    state = torch.random.get_rng_state()
    a = posterior.sample(num_samples, generator=torch.Generator().manual_seed(5))
    b = posterior.sample(num_samples, generator=torch.Generator().manual_seed(5))
    c = posterior.sample(num_samples, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    pooled = draws.reshape(100, 2, 3)
    assert bool((a[:, None] == pooled[None]).all(-1).all(-1).any(-1).all())  # pooled draws


def test_resolve_density_passes_densities_and_traces_programs() -> None:
    from hierbayes.inference.references.target import resolve_density
    from hierbayes.models import PyroTaskDensity, TaskModelDensity

    tasks, model, _, _, _ = linear_problem(T=2)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    assert resolve_density(density, tasks) is density
    assert isinstance(resolve_density(model, tasks), TaskModelDensity)
    assert isinstance(resolve_density(linear_program, tasks), PyroTaskDensity)
    with pytest.raises(TypeError, match="TaskDensity"):
        resolve_density(3.0, tasks)


def linear_program(x: Tensor, y: Tensor | None = None) -> None:
    """The linear-Gaussian model as a hand-written Pyro program (no native density)."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 10.0).to_event(1))
    T, N = x.shape[:2]
    with pyro.plate("tasks", T, dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, PRIOR_SCALE).to_event(1))
        f = (x * phi[..., :2]).sum(-1) + phi[..., 2]
        with pyro.plate("data", N, dim=-1):
            pyro.sample("y", dist.Normal(f, SIGMA), obs=None if y is None else y[..., 0])


def test_meanfield_vi_runs_a_plain_pyro_program() -> None:
    r"""A program's density opens its own plates: mean-field VI evaluates it outside its
    particle and task plates, and finds :math:`m = \mu`, :math:`v_d = H_{dd}^{-1/2}` as for the
    native density (``test_compare``)."""
    from hierbayes.inference.references.meanfield import meanfield_vi

    tasks, _, params, mean, cov = linear_problem(T=2, seed=3)
    q = meanfield_vi(linear_program, params, tasks, num_steps=1200, num_particles=4, seed=1)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    assert float(((q.mean - mean) / sd).abs().max()) < 0.1
    optimal = torch.linalg.inv(cov).diagonal(dim1=-2, dim2=-1).rsqrt()
    torch.testing.assert_close(q.scale, optimal, rtol=0.1, atol=0)
    assert len(q.elbo) == 1200 and q.settings["num_particles"] == 4
    assert len(pyro.get_param_store()) == 0


def test_meanfield_elbo_is_the_mean_over_particles() -> None:
    r"""The particle plate is scaled by :math:`1/S`: with :math:`v \to 0` every particle sits at
    :math:`m`, so the loss estimates the log joint at :math:`m` plus the entropy of :math:`q`,
    whatever ``S`` (with Monte-Carlo error :math:`\sqrt{TD/(2S)}` from :math:`-\log q`); a sum
    over particles would be ``S`` times it."""
    from hierbayes.inference.references.meanfield import meanfield_vi

    tasks, model, params, mean, _ = linear_problem(T=2, seed=3)
    density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    x, y = tasks.support_x, tasks.support_y
    log_joint = density.log_likelihood(params, mean, x, y) + density.log_prior(params, mean, x)
    T, D = mean.shape
    entropy = T * D * (0.5 * math.log(2 * math.pi * math.e) + math.log(1e-6))
    expected = float(log_joint.sum()) + entropy
    for particles in (1, 400):
        q = meanfield_vi(
            density,
            params,
            tasks,
            num_steps=1,
            num_particles=particles,
            lr=1e-12,
            init=mean,
            init_scale=1e-6,
        )
        assert abs(q.elbo[0] - expected) < 5 * math.sqrt(T * D / (2 * particles)), particles
