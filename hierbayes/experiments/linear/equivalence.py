r"""Part 1 of the ``linear`` experiment: gradient descent against MAP on random linear tasks.

On random tasks (over-determined, under-determined and rank-deficient inputs; no, diagonal and
full preconditioners; random :math:`k`, admissible :math:`\alpha` and :math:`\sigma`), the
:math:`k`-step gradient-descent iterate from :math:`\theta` is compared with the MAP estimate
under the implied prior :math:`\mathcal N(\theta, Q)` (Santos 1996; Grant et al. 2018, §3.1).
The largest discrepancy is float64 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hierbayes.experiments.linear.config import float64_default
from hierbayes.inference.linear_gaussian import (
    gradient_descent_iterate,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
    posterior,
)

__all__ = ["PRECONDITIONERS", "REGIMES", "equivalence_battery"]

REGIMES = ("over-determined", "under-determined", "rank-deficient")
PRECONDITIONERS = ("none", "diagonal", "full")


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
    with float64_default():
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
