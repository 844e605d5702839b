"""One attribute a user reads on every posterior (issue 19): ``sd`` on the point mass, the
Laplace, Gaussian, sample and hyper-Laplace posteriors, and ``rhat_max`` a number (per task
under ``rhat_max_per_task``), full Bayes included."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from hierbayes.inference import fit
from hierbayes.inference.diagnostics.arviz_bridge import convergence_diagnostics
from hierbayes.inference.posteriors.samples import SamplePosterior
from hierbayes.inference.references.full_bayes import FullBayesPosterior
from tests.programs import family_program, family_tasks


def _result(method: str = "llama"):  # type: ignore[no-untyped-def]
    tasks = family_tasks("bernoulli", T=4)
    options = {"objective": "evidence"} if method == "llama" else {}
    result = fit(
        family_program("bernoulli"), tasks, method, meta_steps=2, progress=False, **options
    )
    return result, tasks


def test_laplace_sd_is_the_root_of_the_inverse_curvatures_diagonal() -> None:
    result, tasks = _result()
    posterior = result.adapt(tasks)
    expected = posterior.covariance().diagonal(dim1=-2, dim2=-1).sqrt()
    assert_close(posterior.sd, expected)
    assert posterior.sd.shape == posterior.mean.shape and bool((posterior.sd > 0).all())


def test_a_point_mass_has_zero_sd() -> None:
    result, tasks = _result("maml")
    posterior = result.adapt(tasks)
    assert torch.equal(posterior.sd, torch.zeros_like(posterior.mean))


def _samples(T: int = 3, D: int = 2) -> tuple[torch.Tensor, SamplePosterior]:
    result, _ = _result("maml")
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(4, 300, T, D, generator=g) * torch.tensor([0.5, 2.0])
    draws[:, :, 1, 0] = 0.3  # task 1: a constant parameter, R-hat undefined
    posterior = SamplePosterior(
        result.guide.density,
        result.params,
        draws,
        engine="test",
        diagnostics=convergence_diagnostics(draws),
    )
    return draws, posterior


def test_sample_sd_and_a_number_for_rhat_max() -> None:
    draws, posterior = _samples()
    assert_close(posterior.sd, draws.reshape(-1, 3, 2).std(0))
    assert isinstance(posterior.rhat_max, float) and math.isnan(posterior.rhat_max)
    assert posterior.rhat_max_per_task.shape == (3,)
    assert float(posterior.rhat_max_per_task[0]) < 1.01
    assert isinstance(posterior.ess_bulk_min, float)


def test_full_bayes_rhat_max_is_a_number_over_tasks_and_globals() -> None:
    result, _ = _result("maml")
    g = torch.Generator().manual_seed(1)
    draws = torch.randn(4, 300, 3, 2, generator=g)
    theta = torch.randn(4, 300, 2, generator=g)
    theta[2:] += 3.0  # the global's chains disagree: its R-hat is large
    per_global = convergence_diagnostics(theta.unsqueeze(2))  # (1, 2) each
    posterior = FullBayesPosterior(
        result.guide.density,
        {},
        draws,
        {"theta": theta},
        global_diagnostics={"theta": {k: v[0] for k, v in per_global.items()}},
        engine="test",
        diagnostics=convergence_diagnostics(draws),
    )
    assert isinstance(posterior.rhat_max, float)
    assert posterior.rhat_max > 1.2 > float(posterior.rhat_max_per_task.max())
    # the effective sample size too covers the globals: the stuck global has the fewest
    assert posterior.ess_bulk_min == float(per_global["ess_bulk"].min())
    assert posterior.ess_bulk_min < float(posterior.ess_bulk_min_per_task.min())
