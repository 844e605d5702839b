r"""Part 3 of the ``linear`` experiment: empirical Bayes recovers the truth.

:math:`J` tasks are simulated from a known :math:`\theta^*` (:math:`\phi_j\sim\mathcal
N(\theta^*, s^2I)`); :math:`\hat\theta` from exact evidence maximisation (closed form, all of a
task's points) and from MAML (closed form, and :func:`~hierbayes.inference.training.fit` on the
built-in linear model) approaches :math:`\theta^*` like :math:`1/\sqrt J`, as its exact
sampling covariance predicts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hierbayes.experiments.linear.config import LinearConfig, float64_default
from hierbayes.inference.linear_gaussian import (
    ThetaEstimate,
    design_matrix,
    empirical_bayes_theta,
    largest_admissible_step_size,
    maml_theta,
)

__all__ = ["simulate_tasks", "theta_recovery"]


def simulate_tasks(
    J: int,
    config: LinearConfig,
    generator: torch.Generator,
    replicates: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(xs, ys, xq, yq)`` of ``J`` tasks from the model with :math:`\theta^*`:
    :math:`\phi_j\sim\mathcal N(\theta^*, s^2 I)`, :math:`y = [x, 1]^\top\phi_j + \sigma\epsilon`.

    Shapes ``(*replicates, J, N, d)`` and ``(*replicates, J, N, 1)``, with
    :math:`d = \dim\theta^* - 1` (the last coordinate is the bias).
    """
    theta = torch.tensor(config.theta_star, dtype=torch.float64)
    D = theta.numel()
    rep = tuple(replicates)
    phi = theta + config.prior_scale * torch.randn(*rep, J, D, generator=generator)
    xs = torch.randn(*rep, J, config.shots, D - 1, generator=generator)
    xq = torch.randn(*rep, J, config.query_shots, D - 1, generator=generator)
    ys = design_matrix(xs, bias=True) @ phi[..., None]
    yq = design_matrix(xq, bias=True) @ phi[..., None]
    ys = ys + config.noise_scale * torch.randn(ys.shape, generator=generator)
    yq = yq + config.noise_scale * torch.randn(yq.shape, generator=generator)
    return xs, ys, xq, yq


def _estimates(
    xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, config: LinearConfig
) -> dict[str, ThetaEstimate]:
    Xs, Xq = design_matrix(xs, bias=True), design_matrix(xq, bias=True)
    prior = config.prior_scale**2 * torch.eye(Xs.shape[-1], dtype=Xs.dtype)
    return {
        "empirical_bayes": empirical_bayes_theta(
            torch.cat([Xs, Xq], -2),
            torch.cat([ys, yq], -2),
            noise_scale=config.noise_scale,
            prior_covariance=prior,
        ),
        "maml": maml_theta(
            Xs,
            ys,
            Xq,
            yq,
            noise_scale=config.noise_scale,
            step_size=config.step_size,
            steps=config.inner_steps,
            generative_prior_covariance=prior,
        ),
    }


def theta_recovery(config: LinearConfig) -> dict[str, Any]:
    r"""‖θ̂ − θ*‖ against the number of tasks J for exact empirical Bayes and MAML.

    For each J: ``replicates`` independent collections (closed-form estimators; the root mean
    square error and the predicted one, :math:`\sqrt{\operatorname{tr}C_J}`, and the mean of
    the squared Mahalanobis distance over :math:`D`, which is 1 when the covariance is right),
    and one collection meta-trained with :func:`~hierbayes.inference.training.fit` (MAML on the built-in
    :class:`~hierbayes.models.BayesianLinearRegression`, no hyperprior, full-batch), compared
    with the closed form on the same tasks.
    """
    from hierbayes.inference import fit
    from hierbayes.models import BayesianLinearRegression
    from hierbayes.tasks import TaskCollection

    with float64_default():
        g = torch.Generator().manual_seed(config.seed + 1)
        theta_star = torch.tensor(config.theta_star, dtype=torch.float64)
        D = theta_star.numel()
        out: dict[str, Any] = {"J": list(config.task_counts), "theta_star": list(config.theta_star)}
        series: dict[str, dict[str, Any]] = {
            name: {"rms_error": [], "predicted_rms_error": [], "mean_mahalanobis2_over_D": []}
            for name in ("empirical_bayes", "maml")
        }
        replicate_errors: dict[str, list[list[float]]] = {"empirical_bayes": [], "maml": []}
        fitted: dict[str, list[float]] = {
            "error": [],
            "closed_form_error": [],
            "max_abs_vs_closed_form": [],
            "seconds": [],
        }
        # exact evidence maximisation through fit(): LLAMA's Laplace evidence objective is
        # exact on this model, so its optimum is the closed-form empirical-Bayes estimate
        fitted_evidence: dict[str, list[float]] = {
            "error": [],
            "closed_form_error": [],
            "max_abs_vs_closed_form": [],
            "seconds": [],
        }
        admissible_tasks, total_tasks = 0, 0
        for J in config.task_counts:
            data = simulate_tasks(J, config, g, replicates=(config.replicates,))
            Xs = design_matrix(data[0], bias=True)
            admissible = largest_admissible_step_size(Xs, noise_scale=config.noise_scale)
            admissible_tasks += int((admissible > config.step_size).sum())
            total_tasks += admissible.numel()
            for name, est in _estimates(*data, config).items():
                err = (est.theta - theta_star).norm(dim=-1)
                replicate_errors[name].append(err.tolist())
                series[name]["rms_error"].append(float(err.square().mean().sqrt()))
                series[name]["predicted_rms_error"].append(
                    float(est.standard_error().square().mean().sqrt())
                )
                series[name]["mean_mahalanobis2_over_D"].append(
                    float(est.squared_mahalanobis(theta_star).mean()) / D
                )
            # One collection through fit(): the same tasks as replicate 0. MAML against its
            # closed form; LLAMA's Laplace evidence (exact on this model) against the
            # closed-form evidence maximiser.
            xs, ys, xq, yq = (t[0] for t in data)
            closed = _estimates(xs, ys, xq, yq, config)
            collection = TaskCollection.from_tensors(xs, ys, xq, yq)
            runs: tuple[tuple[dict[str, list[float]], Tensor, dict[str, Any], Any], ...] = (
                (
                    fitted,
                    closed["maml"].theta,
                    {"method": "maml"},
                    BayesianLinearRegression(
                        D - 1, bias=True, noise_scale=config.noise_scale, hyperprior_scale=None
                    ),
                ),
                (
                    fitted_evidence,
                    closed["empirical_bayes"].theta,
                    {"method": "llama", "objective": "evidence", "curvature": "ggn"},
                    BayesianLinearRegression(
                        D - 1,
                        bias=True,
                        noise_scale=config.noise_scale,
                        prior_scale=config.prior_scale,
                        hyperprior_scale=None,
                    ),
                ),
            )
            for record, closed_theta, options, model in runs:
                started = time.perf_counter()
                result = fit(
                    model,
                    collection,
                    meta_steps=config.fit_steps,
                    meta_batch_size=J,
                    inner_steps=config.inner_steps,
                    step_size=config.step_size,
                    lr=config.fit_lr,
                    seed=config.seed,
                    progress=config.progress,
                    **options,
                )
                record["seconds"].append(round(time.perf_counter() - started, 3))
                record["error"].append(float((result.theta - theta_star).norm()))
                record["closed_form_error"].append(float((closed_theta - theta_star).norm()))
                record["max_abs_vs_closed_form"].append(
                    float((result.theta - closed_theta).abs().max())
                )
    logJ = torch.log(torch.tensor(config.task_counts, dtype=torch.float64))
    for values in series.values():
        # Least-squares slope of log RMS error against log J: -1/2 for a √J-consistent estimator.
        if len(config.task_counts) > 1:
            logE = torch.log(torch.tensor(values["rms_error"], dtype=torch.float64))
            dJ = logJ - logJ.mean()
            values["loglog_slope"] = float((dJ * (logE - logE.mean())).sum() / dJ.square().sum())
    out.update(series)
    out["fit_maml"] = fitted
    out["fit_evidence"] = fitted_evidence
    out["replicate_errors"] = replicate_errors
    out["replicates"] = config.replicates
    # Tasks whose inputs admit an implied Gaussian prior for MAML's step (αλ_max < 1); the
    # closed-form MAML estimate and its covariance hold for every task regardless.
    out["fraction_of_tasks_with_implied_prior"] = admissible_tasks / total_tasks
    return out
