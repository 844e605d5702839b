r"""Figures of the ``linear`` experiment: gradient-descent paths in 2-D and θ recovery.

Drawn with matplotlib's object API on an Agg canvas (:func:`hierbayes.experiments.plots.agg_figure`):
no pyplot, so drawing never changes the user's matplotlib backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hierbayes.experiments.plots import agg_figure
from hierbayes.inference.linear_gaussian import (
    gradient_descent_iterate,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
    posterior,
)

__all__ = ["PATH_STEPS", "plot_gd_paths", "plot_theta_recovery"]

#: k of the three panels of the path figure.
PATH_STEPS = (1, 3, 10)


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

    fig = agg_figure(5.0 * len(PATH_STEPS), 4.8)
    axes = fig.subplots(1, len(PATH_STEPS))
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
    return out


def plot_theta_recovery(recovery: dict[str, Any], path: str | Path) -> Path:
    """‖θ̂ − θ*‖ against J (log-log): replicate errors, their RMS, the predicted RMS, and fit()."""
    J = recovery["J"]
    fig = agg_figure(6.8, 4.8)
    ax = fig.subplots()
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
    return out
