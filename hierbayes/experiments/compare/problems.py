r"""The two problems of ``python -m hierbayes compare``: linear-Gaussian and sinusoid.

* **linear**: Bayesian linear regression (:class:`~hierbayes.models.BayesianLinearRegression`,
  ``D = 4``), where the exact posterior (:func:`exact_linear_posterior`) joins as the row
  ``exact``;
* **sinusoid**: the 1-40-40-1 ReLU network of Finn et al. (2017) (``D = 1761``) on 10-shot
  sinusoid tasks, after a short MAML run.

Each is meta-trained with MAML (:func:`~hierbayes.inference.training.fit`); its held-out tasks
are then adapted by every method with the same :math:`\hat\theta` (and noise scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hierbayes.experiments.compare.approximations import (
    score_problem,
    shared_approximations,
    timed,
)
from hierbayes.experiments.compare.settings import HELDOUT_SEED, CompareSettings
from hierbayes.inference import fit, linear_gaussian
from hierbayes.inference.diagnostics.compare import ComparisonResult
from hierbayes.inference.posteriors.gaussian import GaussianPosterior
from hierbayes.models import BayesianLinearRegression, GaussianLikelihood, NeuralRegression
from hierbayes.models.density import TaskDensity
from hierbayes.models.structure import model_structure
from hierbayes.tasks import SinusoidTasks, TaskBatch

__all__ = ["exact_linear_posterior", "linear_tasks", "run_linear", "run_sinusoid"]


def linear_tasks(
    num_tasks: int,
    *,
    shots: int,
    query: int,
    input_dim: int,
    noise_scale: float,
    generator: torch.Generator,
    task_scale: float = 0.7,
) -> TaskBatch:
    r"""Linear-Gaussian tasks :math:`y = x^\top w_j + b_j + \sigma\epsilon`, with
    :math:`(w_j, b_j) \sim \mathcal N(\theta^*, 0.7^2 I)` around a fixed
    :math:`\theta^* = (1, -0.5, 0.25, \ldots, 0.5)` and :math:`x \sim \mathcal N(0, I)`."""
    D = input_dim + 1
    center = torch.tensor([(-0.5) ** i for i in range(input_dim)] + [0.5])
    phi = center + task_scale * torch.randn(num_tasks, D, generator=generator)
    x = torch.randn(num_tasks, shots + query, input_dim, generator=generator)
    f = (x * phi[:, None, :input_dim]).sum(-1, keepdim=True) + phi[:, None, input_dim:]
    y = f + noise_scale * torch.randn(f.shape, generator=generator)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def exact_linear_posterior(
    model: BayesianLinearRegression,
    params: Mapping[str, torch.Tensor],
    tasks: TaskBatch,
    *,
    density: TaskDensity | None = None,
) -> GaussianPosterior:
    r"""The exact posterior of each task of :class:`~hierbayes.models.BayesianLinearRegression`
    given its support set and the globals (MATH.md §3):

    .. math::

        H = \tilde X^\top \tilde X/\sigma^2 + I/s^2, \qquad
        \Sigma = H^{-1}, \qquad \mu = \Sigma(\tilde X^\top y/\sigma^2 + \hat\theta/s^2),

    with :math:`\tilde X = [X, 1]` when the model has a bias (the layout of ``nn.Linear``:
    weights, then bias), from :func:`hierbayes.inference.linear_gaussian.posterior`. Its
    ``predict`` is linearised, which is exact here. ``density`` defaults to the model's own
    task density on ``tasks``.
    """
    x, y, mask = tasks.support_x, tasks.support_y, tasks.support_mask
    features = linear_gaussian.design_matrix(x, bias=model.bias)
    if mask is not None:  # a padded point contributes a zero row
        features = features * mask[..., None].to(features)
        y = y * mask[..., None].to(y)
    likelihood = model.likelihood
    if not isinstance(likelihood, GaussianLikelihood) or likelihood.per_task:
        raise TypeError(
            f"the exact posterior needs a Gaussian likelihood with a global noise scale; got "
            f"{likelihood!r}"
        )
    scale = model.prior_scale_of(params)
    D = features.shape[-1]
    exact = linear_gaussian.posterior(
        model.theta_of(params),
        features,
        y,
        noise_scale=likelihood.scale(params),
        prior_precision=torch.eye(D, dtype=features.dtype, device=features.device) / scale**2,
    )
    mean, covariance = exact.mean, exact.covariance
    if density is None:
        density = model.task_density(model_structure(model, tasks.support_x, tasks.support_y))
    return GaussianPosterior(density, params, mean, covariance, predict_method="linearized")


def run_linear(settings: CompareSettings, out: Path) -> tuple[dict[str, Any], ComparisonResult]:
    """The linear-Gaussian problem; returns its report and comparison."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(settings.seed)

    def tasks_of(num_tasks: int, generator: torch.Generator) -> TaskBatch:
        return linear_tasks(
            num_tasks,
            shots=settings.linear_shots,
            query=settings.linear_query,
            input_dim=settings.linear_input_dim,
            noise_scale=settings.linear_noise,
            generator=generator,
        ).to(dtype=dtype)

    train = tasks_of(settings.linear_train_tasks, g)
    heldout = tasks_of(settings.tasks, torch.Generator().manual_seed(HELDOUT_SEED))
    model = BayesianLinearRegression(
        settings.linear_input_dim, bias=True, noise_scale=settings.linear_noise
    )
    result = fit(
        model,
        train,
        meta_steps=settings.linear_meta_steps,
        meta_batch_size=25,
        inner_steps=1,
        step_size=0.01,
        lr=0.02,
        seed=settings.seed,
        dtype=dtype,
        progress=settings.progress,
    )
    posteriors, times = shared_approximations(
        result,
        heldout,
        settings,
        numpyro_samples=settings.num_samples,
        pyro_samples=settings.num_samples,
        pyro_chains=settings.num_chains,
    )
    exact, times["exact"] = timed(
        lambda: exact_linear_posterior(model, result.params, heldout, density=result.guide.density)
    )
    posteriors["exact"] = exact
    problem = (
        f"Bayesian linear regression, D = {settings.linear_input_dim + 1}, "
        f"{settings.linear_shots}-shot, {settings.tasks} held-out tasks"
    )
    return score_problem(posteriors, times, heldout, result, settings, out, "linear", problem)


def run_sinusoid(settings: CompareSettings, out: Path) -> tuple[dict[str, Any], ComparisonResult]:
    """The sinusoid problem; returns its report and comparison."""
    dtype = torch.float64
    num_tasks = settings.sinusoid_tasks or settings.tasks
    source = SinusoidTasks(shots=settings.sinusoid_shots, query_shots=settings.sinusoid_query)
    heldout = source.sample(
        num_tasks, generator=torch.Generator().manual_seed(HELDOUT_SEED), dtype=dtype
    )
    torch.manual_seed(settings.seed)  # the network's initialisation, theta_0
    # prior scale 0.1 (prior precision 100), the LLAMA default: with s = 1 the 1761-dimensional
    # posterior is so broad that every Gaussian and sampled predictive is poor
    model = NeuralRegression(prior_scale=0.1)
    result = fit(
        model,
        source,
        meta_steps=settings.sinusoid_meta_steps,
        meta_batch_size=25,
        inner_steps=1,
        step_size=2 * 0.01 / settings.sinusoid_shots,
        lr=1e-3,
        seed=settings.seed,
        dtype=dtype,
        progress=settings.progress,
    )
    posteriors, times = shared_approximations(
        result,
        heldout,
        settings,
        numpyro_samples=settings.sinusoid_num_samples,
        pyro_samples=settings.sinusoid_pyro_samples,
        pyro_chains=settings.sinusoid_pyro_chains,
        max_tree_depth=settings.sinusoid_max_tree_depth,
    )
    problem = (
        f"sinusoid, 1-40-40-1 ReLU (D = {model.num_params}), "
        f"{settings.sinusoid_shots}-shot, {num_tasks} held-out tasks"
    )
    return score_problem(posteriors, times, heldout, result, settings, out, "sinusoid", problem)
