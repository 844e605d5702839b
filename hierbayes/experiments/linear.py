r"""The linear-Gaussian experiment: the paper's theorem made executable (MATH.md §3).

``python -m hierbayes linear --out DIR`` runs three parts and writes ``DIR/metrics.json``,
``DIR/gd_paths.png`` and ``DIR/theta_recovery.png``:

1. **Equivalence battery.** On random linear tasks (over-determined, under-determined and
   rank-deficient inputs; no, diagonal and full preconditioners; random :math:`k`, admissible
   :math:`\alpha` and :math:`\sigma`), the :math:`k`-step gradient-descent iterate from
   :math:`\theta` is compared with the MAP estimate under the implied prior
   :math:`\mathcal N(\theta, Q)` (Santos 1996; Grant et al. 2018, §3.1). The largest
   discrepancy is float64 rounding.
2. **Gradient-descent paths in 2-D** for :math:`k = 1, 3, 10`: the path from :math:`\theta`
   over the contours of the likelihood and of the implied prior, ending on the MAP.
3. **Empirical Bayes recovers the truth.** :math:`J` tasks are simulated from a known
   :math:`\theta^*` (:math:`\phi_j\sim\mathcal N(\theta^*, s^2I)`); :math:`\hat\theta` from
   exact evidence maximisation (closed form, all of a task's points) and from MAML (closed
   form, and :func:`~hierbayes.inference.training.fit` on the built-in linear model) approaches
   :math:`\theta^*` like :math:`1/\sqrt J`, as its exact sampling covariance predicts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.linear_gaussian import (
    ThetaEstimate,
    design_matrix,
    empirical_bayes_theta,
    gradient_descent_iterate,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
    maml_theta,
    posterior,
)

__all__ = [
    "LinearConfig",
    "add_parser",
    "equivalence_battery",
    "plot_gd_paths",
    "plot_theta_recovery",
    "run",
    "run_linear",
    "simulate_tasks",
    "theta_recovery",
]

REGIMES = ("over-determined", "under-determined", "rank-deficient")
PRECONDITIONERS = ("none", "diagonal", "full")
#: k of the three panels of the path figure.
PATH_STEPS = (1, 3, 10)


@dataclass
class LinearConfig:
    """Settings of the ``linear`` experiment (defaults: about half a minute on one CPU core)."""

    problems: int = 300
    seed: int = 0
    task_counts: tuple[int, ...] = (8, 32, 128, 512, 2048)
    replicates: int = 100
    theta_star: tuple[float, ...] = (1.5, -1.0, 0.5)
    noise_scale: float = 0.5
    prior_scale: float = 1.0
    shots: int = 5
    query_shots: int = 10
    inner_steps: int = 3
    step_size: float = 0.01
    fit_steps: int = 600
    fit_lr: float = 0.05
    progress: bool = False


@contextmanager
def _float64() -> Iterator[None]:
    """Run in float64 (task collections and models take the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# -- 1. the equivalence battery --------------------------------------------------------------------


def _random_problem(index: int, g: torch.Generator) -> dict[str, Any]:
    regime = REGIMES[index % 3]
    kind = PRECONDITIONERS[(index // 3) % 3]

    def integer(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    def log_uniform(lo: float, hi: float) -> float:
        u = float(torch.rand((), generator=g))
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    if regime == "over-determined":
        D = integer(1, 8)
        N, rank = integer(D + 1, D + 10), D
    elif regime == "under-determined":
        D = integer(2, 10)
        N = integer(1, D - 1)
        rank = N
    else:
        N, D = integer(1, 10), integer(1, 10)
        rank = integer(0, min(N, D) - 1)
    scale = log_uniform(0.1, 10.0)
    X = (
        scale * torch.randn(N, rank, generator=g) @ torch.randn(rank, D, generator=g)
        if rank > 0
        else torch.zeros(N, D)
    )
    if kind == "none":
        B = None
    elif kind == "diagonal":
        B = torch.exp(torch.randn(D, generator=g))
    else:
        W = torch.randn(D, D, generator=g)
        B = W @ W.T / D + 0.1 * torch.eye(D)
    sigma = log_uniform(0.05, 5.0)
    k = integer(1, 20)
    fraction = 0.01 + 0.98 * float(torch.rand((), generator=g))
    limit = float(largest_admissible_step_size(X, noise_scale=sigma, preconditioner=B))
    alpha = fraction * limit if math.isfinite(limit) else fraction
    theta = 3.0 * torch.randn(D, generator=g)
    y = X @ torch.randn(D, generator=g) + sigma * torch.randn(N, generator=g)
    return dict(
        regime=regime,
        preconditioner=kind,
        N=N,
        D=D,
        rank=rank,
        k=k,
        fraction=fraction,
        alpha=alpha,
        sigma=sigma,
        X=X,
        y=y,
        theta=theta,
        B=B,
        kappa=(1.0 - fraction) ** (-k) if math.isfinite(limit) else 1.0,
    )


def equivalence_battery(problems: int = 300, seed: int = 0) -> dict[str, Any]:
    r"""Largest :math:`|\phi_{(k)} - \mu|` over ``problems`` random linear tasks.

    :math:`\phi_{(k)}` is :func:`~hierbayes.inference.linear_gaussian.gradient_descent_iterate`;
    :math:`\mu` the posterior mean under :math:`\mathcal N(\theta, Q)` from the implied prior
    precision (the well-conditioned route). The regimes and preconditioner kinds cycle, so
    every combination is equally represented; :math:`k \in [1, 20]`, :math:`\alpha` a uniform
    fraction in :math:`[0.01, 0.99]` of :math:`1/\lambda_{\max}`, :math:`\sigma` log-uniform
    in :math:`[0.05, 5]`. Also reports the covariance ("Kalman") form of the MAP on the
    problems where it is usable (:math:`\kappa = (1-\alpha\lambda_{\max})^{-k} \le 10^8`).
    """
    if problems < 1:
        raise ValueError(f"problems must be at least 1; got {problems}")
    with _float64():
        g = torch.Generator().manual_seed(seed)
        worst_abs, worst_rel, worst_kalman_rel, kalman_checked = 0.0, 0.0, 0.0, 0
        worst: dict[str, Any] = {}
        by_regime = {r: 0.0 for r in REGIMES}
        by_kind = {p: 0.0 for p in PRECONDITIONERS}
        for i in range(problems):
            p = _random_problem(i, g)
            opts = dict(
                noise_scale=p["sigma"],
                step_size=p["alpha"],
                steps=p["k"],
                preconditioner=p["B"],
            )
            gd = gradient_descent_iterate(p["theta"], p["X"], p["y"], **opts)
            precision = implied_prior_precision(p["X"], **opts)
            mean = posterior(
                p["theta"], p["X"], p["y"], noise_scale=p["sigma"], prior_precision=precision
            ).mean
            abs_err = float((gd - mean).abs().max())
            rel_err = abs_err / (1.0 + float(gd.abs().max()))
            by_regime[p["regime"]] = max(by_regime[p["regime"]], abs_err)
            by_kind[p["preconditioner"]] = max(by_kind[p["preconditioner"]], abs_err)
            worst_rel = max(worst_rel, rel_err)
            if abs_err >= worst_abs:
                worst_abs = abs_err
                worst = {
                    k: p[k]
                    for k in (
                        "regime",
                        "preconditioner",
                        "N",
                        "D",
                        "rank",
                        "k",
                        "fraction",
                        "sigma",
                    )
                }
            if p["kappa"] <= 1e8:
                Q = implied_prior_covariance(p["X"], **opts)
                kalman = posterior(
                    p["theta"], p["X"], p["y"], noise_scale=p["sigma"], prior_covariance=Q
                ).mean
                err = float((gd - kalman).abs().max()) / (1.0 + float(gd.abs().max()))
                worst_kalman_rel = max(worst_kalman_rel, err)
                kalman_checked += 1
    return {
        "max_abs_gd_vs_map": worst_abs,
        "max_rel_gd_vs_map": worst_rel,
        "problems_checked": problems,
        "max_abs_by_regime": by_regime,
        "max_abs_by_preconditioner": by_kind,
        "worst_problem": worst,
        "covariance_form": {
            "max_rel_gd_vs_map": worst_kalman_rel,
            "problems_checked": kalman_checked,
            "note": "MAP from Q itself (Kalman form), on problems with (1 - αλ_max)^(-k) <= 1e8",
        },
    }


# -- 2. paths in two dimensions --------------------------------------------------------------------


def _path_problem() -> dict[str, Tensor]:
    """A fixed 2-D task whose likelihood is elongated (eigenvalues of XᵀX about 10 and 1)."""
    X = torch.tensor([[2.0, 0.6], [1.0, 1.2], [-1.6, 0.4]], dtype=torch.float64)
    y = torch.tensor([1.9, 2.6, -0.6], dtype=torch.float64)
    theta = torch.tensor([-1.8, -1.6], dtype=torch.float64)
    return {"X": X, "y": y, "theta": theta}


def plot_gd_paths(path: str | Path, *, fraction: float = 0.3, noise_scale: float = 1.0) -> Path:
    r"""One PNG with a panel per :math:`k \in \{1, 3, 10\}` for a fixed 2-D task.

    Each panel shows the contours of the likelihood :math:`\mathcal N(y; X\phi, \sigma^2 I)`
    (around the least-squares solution) and of the implied prior :math:`\mathcal N(\theta, Q_k)`
    (1, 2 and 3 standard deviations), the gradient-descent path :math:`\phi_{(0)} = \theta,
    \ldots, \phi_{(k)}` with :math:`\alpha = ` ``fraction``:math:`/\lambda_{\max}`, and the MAP
    under :math:`\mathcal N(\theta, Q_k)`, which the path ends on.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prob = _path_problem()
    X, y, theta = prob["X"], prob["y"], prob["theta"]
    sigma = noise_scale
    alpha = fraction * float(largest_admissible_step_size(X, noise_scale=sigma))
    G = X.T @ X / sigma**2
    ls = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    lo = torch.minimum(theta, ls) - 1.6
    hi = torch.maximum(theta, ls) + 1.6
    grid_x = torch.linspace(float(lo[0]), float(hi[0]), 300, dtype=torch.float64)
    grid_y = torch.linspace(float(lo[1]), float(hi[1]), 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid_x, grid_y, indexing="xy")
    pts = torch.stack([gx, gy], -1)  # (300, 300, 2)
    d_ls = pts - ls
    # Likelihood in Mahalanobis units around the least-squares solution (its exact shape).
    lik_m = ((d_ls @ G) * d_ls).sum(-1).sqrt()

    fig, axes = plt.subplots(1, len(PATH_STEPS), figsize=(5.0 * len(PATH_STEPS), 4.8))
    for ax, k in zip(axes, PATH_STEPS, strict=True):
        Q = implied_prior_covariance(X, noise_scale=sigma, step_size=alpha, steps=k)
        P = implied_prior_precision(X, noise_scale=sigma, step_size=alpha, steps=k)
        d_th = pts - theta
        prior_m = ((d_th @ P) * d_th).sum(-1).sqrt()
        iterates = torch.stack(
            [
                gradient_descent_iterate(theta, X, y, noise_scale=sigma, step_size=alpha, steps=i)
                for i in range(k + 1)
            ]
        )
        map_ = posterior(theta, X, y, noise_scale=sigma, prior_precision=P).mean
        ax.contour(gx, gy, lik_m, levels=[0.5, 1, 2, 3, 4, 5], colors="tab:blue", linewidths=0.9)
        ax.contour(gx, gy, prior_m, levels=[1, 2, 3], colors="tab:orange", linewidths=1.2)
        ax.plot(iterates[:, 0], iterates[:, 1], "-o", color="black", ms=3.5, lw=1.2)
        ax.plot(*theta.tolist(), "s", color="tab:orange", ms=8, label="θ (prior mean, start)")
        ax.plot(*ls.tolist(), "x", color="tab:blue", ms=9, mew=2, label="least squares")
        ax.plot(
            *map_.tolist(),
            "*",
            color="tab:red",
            ms=16,
            mfc="none",
            mew=1.6,
            label=f"MAP under N(θ, Q_{k})",
        )
        ax.plot([], [], "-", color="tab:blue", lw=0.9, label="likelihood contours")
        ax.plot([], [], "-", color="tab:orange", lw=1.2, label="implied prior: 1, 2, 3 sd")
        ax.plot([], [], "-o", color="black", ms=3.5, label=f"{k} gradient step(s)")
        q = torch.linalg.eigvalsh(Q)
        gap = float((iterates[-1] - map_).abs().max())
        ax.set_title(
            f"k = {k}: prior sd {math.sqrt(q[0]):.2f}, {math.sqrt(q[1]):.2f}\n"
            f"|GD − MAP| = {gap:.1e}",
            fontsize=10,
        )
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
        ax.set_aspect("equal")
        ax.set_xlabel("φ₁")
        ax.set_ylabel("φ₂")
        if k == PATH_STEPS[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"k steps of gradient descent from θ are exactly MAP under N(θ, Q_k)  "
        f"(α = {fraction:g}/λ_max, σ = {sigma:g})"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- 3. θ recovery ---------------------------------------------------------------------------------


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

    with _float64():
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


def plot_theta_recovery(recovery: dict[str, Any], path: str | Path) -> Path:
    """‖θ̂ − θ*‖ against J (log-log): replicate errors, their RMS, the predicted RMS, and fit()."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    J = recovery["J"]
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    styles = {
        "empirical_bayes": ("tab:green", "exact empirical Bayes (evidence max., closed form)"),
        "maml": ("tab:purple", "MAML (closed form)"),
    }
    for i, (name, (color, label)) in enumerate(styles.items()):
        shift = 0.93 if i == 0 else 1.07
        for Jj, errs in zip(J, recovery["replicate_errors"][name], strict=True):
            ax.scatter([Jj * shift] * len(errs), errs, s=4, color=color, alpha=0.15, lw=0)
        ax.plot(J, recovery[name]["rms_error"], "o-", color=color, label=f"{label}: RMS error")
        ax.plot(
            J,
            recovery[name]["predicted_rms_error"],
            "--",
            color=color,
            lw=1.2,
            label="predicted √tr Cov θ̂",
        )
    ax.plot(
        J,
        recovery["fit_maml"]["error"],
        "k*",
        ms=10,
        mfc="none",
        label="fit(method='maml'), one collection",
    )
    ax.plot(
        J,
        recovery["fit_maml"]["closed_form_error"],
        "k.",
        ms=4,
        label="closed-form MAML, same collection",
    )
    ax.plot(
        J,
        recovery["fit_evidence"]["error"],
        "gx",
        ms=8,
        label="fit(method='llama', objective='evidence'), same collection",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of tasks J")
    ax.set_ylabel("‖θ̂ − θ*‖")
    ax.set_title(
        f"θ recovery: {recovery['replicates']} replicate collections per J (dots); slope −1/2",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- the command -----------------------------------------------------------------------------------


def run_linear(config: LinearConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Run the three parts; return the metrics (also written to ``out/metrics.json``)."""
    started = time.perf_counter()
    battery = equivalence_battery(config.problems, config.seed)
    recovery = theta_recovery(config)
    metrics: dict[str, Any] = {
        "max_abs_gd_vs_map": battery["max_abs_gd_vs_map"],
        "max_rel_gd_vs_map": battery["max_rel_gd_vs_map"],
        "problems_checked": battery["problems_checked"],
        "equivalence": battery,
        "theta_recovery": {k: v for k, v in recovery.items() if k != "replicate_errors"},
        "config": asdict(config),
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        with _float64():
            metrics["figures"] = {
                "gd_paths": str(plot_gd_paths(folder / "gd_paths.png")),
                "theta_recovery": str(plot_theta_recovery(recovery, folder / "theta_recovery.png")),
            }
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    if out is not None:
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def format_report(metrics: dict[str, Any]) -> str:
    """A short text report of :func:`run_linear`'s metrics."""
    eq = metrics["equivalence"]
    rec = metrics["theta_recovery"]
    lines = [
        "Linear-Gaussian exactness: k gradient steps from θ = MAP under N(θ, Q)  (MATH.md §3)",
        f"  {eq['problems_checked']} random problems (over-/under-determined, rank-deficient; "
        "no, diagonal, full preconditioner; k ≤ 20; α up to 0.99/λ_max)",
        f"  largest |GD − MAP| = {eq['max_abs_gd_vs_map']:.2e}   "
        f"(relative {eq['max_rel_gd_vs_map']:.2e})",
        "  by regime:        "
        + ", ".join(f"{k} {v:.1e}" for k, v in eq["max_abs_by_regime"].items()),
        "  by preconditioner: "
        + ", ".join(f"{k} {v:.1e}" for k, v in eq["max_abs_by_preconditioner"].items()),
        "",
        f"θ recovery from J tasks, θ* = {tuple(rec['theta_star'])}, RMS ‖θ̂ − θ*‖ over "
        f"{rec['replicates']} collections (predicted):",
        f"  {'J':>6s}  {'exact EB':>20s}  {'MAML':>20s}  {'fit(maml) − closed':>19s}"
        f"  {'fit(evidence) − closed EB':>26s}",
    ]
    for i, J in enumerate(rec["J"]):
        eb, mm = rec["empirical_bayes"], rec["maml"]
        lines.append(
            f"  {J:>6d}  {eb['rms_error'][i]:>9.4f} ({eb['predicted_rms_error'][i]:.4f})  "
            f"{mm['rms_error'][i]:>9.4f} ({mm['predicted_rms_error'][i]:.4f})  "
            f"{rec['fit_maml']['max_abs_vs_closed_form'][i]:>19.1e}"
            f"  {rec['fit_evidence']['max_abs_vs_closed_form'][i]:>26.1e}"
        )
    if "loglog_slope" in rec["maml"]:
        lines.append(
            "  slope of log RMS error against log J: "
            f"exact EB {rec['empirical_bayes']['loglog_slope']:.3f}, "
            f"MAML {rec['maml']['loglog_slope']:.3f} (−1/2 expected)"
        )
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``linear`` subcommand to an ``argparse`` subparsers object."""
    defaults = LinearConfig()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "linear",
        help="linear-Gaussian exactness: gradient descent = MAP under an implied prior",
        description=(
            "Checks k-step gradient descent against MAP under the implied Gaussian prior on "
            "random linear tasks, draws 2-D paths, and shows empirical Bayes recovering θ*."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/linear"), help="output folder")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--problems",
        type=int,
        default=defaults.problems,
        help=f"random problems in the equivalence battery (default {defaults.problems})",
    )
    p.add_argument(
        "--replicates",
        type=int,
        default=defaults.replicates,
        help="replicate task collections per J for the recovery curve",
    )
    p.add_argument(
        "--tasks",
        type=str,
        default=",".join(map(str, defaults.task_counts)),
        help="comma-separated numbers of tasks J (default %(default)s)",
    )
    p.add_argument(
        "--fit-steps",
        type=int,
        default=defaults.fit_steps,
        help="Adam steps of fit(method='maml') at each J",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the ``linear`` command from parsed arguments; print a report and return the metrics."""
    try:
        tasks = tuple(int(t) for t in str(args.tasks).split(",") if t.strip())
    except ValueError as err:
        raise SystemExit(f"--tasks must be comma-separated integers; got {args.tasks!r}") from err
    config = LinearConfig(
        problems=args.problems,
        seed=args.seed,
        replicates=args.replicates,
        task_counts=tasks,
        fit_steps=args.fit_steps,
    )
    metrics = run_linear(config, args.out)
    print(format_report(metrics))
    print(
        f"\nwrote {Path(args.out) / 'metrics.json'}, gd_paths.png and theta_recovery.png "
        f"({metrics['seconds']:.1f} s)"
    )
    return metrics
