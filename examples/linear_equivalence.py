"""See the theorem: k steps of gradient descent in linear regression are exactly MAP under a
Gaussian prior N(θ, Q) whose covariance depends on the step size, k and the task's inputs
(Santos 1996; Grant et al. 2018, §3.1).

Run it:

    python examples/linear_equivalence.py            # prints the check
    python examples/linear_equivalence.py --out DIR  # and draws DIR/gd_paths.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hierbayes.inference.linear_gaussian import (
    InadmissibleStepSizeError,
    gradient_descent_iterate,
    implied_prior_covariance,
    implied_prior_precision,
    largest_admissible_step_size,
    log_evidence,
    posterior,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also draw the 2-D paths here")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)

    # One task: 4 points, 6 parameters (under-determined: two directions the data never see).
    X = torch.randn(4, 6, generator=g)
    y = torch.randn(4, generator=g)
    theta = torch.randn(6, generator=g)  # the meta-learned initialisation = the prior mean
    sigma, k = 0.5, 5
    alpha = 0.5 * float(largest_admissible_step_size(X, noise_scale=sigma))  # half the bound

    # MAML's inner loop: k gradient steps on ||y - Xφ||² / (2σ²), starting at θ.
    phi_k = gradient_descent_iterate(theta, X, y, noise_scale=sigma, step_size=alpha, steps=k)

    # The prior those k steps assume, and the MAP under it.
    Q = implied_prior_covariance(X, noise_scale=sigma, step_size=alpha, steps=k)
    P = implied_prior_precision(X, noise_scale=sigma, step_size=alpha, steps=k)
    map_ = posterior(theta, X, y, noise_scale=sigma, prior_precision=P).mean

    print(f"k = {k} steps of size α = {alpha:.4g} from θ on a task with X of shape (4, 6)")
    print("  gradient descent φ_k :", [round(v, 6) for v in phi_k.tolist()])
    print("  MAP under N(θ, Q)    :", [round(v, 6) for v in map_.tolist()])
    print(f"  largest difference   : {float((phi_k - map_).abs().max()):.1e}")
    variances = [round(v, 4) for v in torch.linalg.eigvalsh(Q).tolist()]
    print("  implied prior variances (eigenvalues of Q):", variances)
    print(f"  (the two directions the data cannot see keep kα = {k * alpha:.4f})")
    evidence = float(log_evidence(theta, X, y, noise_scale=sigma, prior_covariance=Q))
    print(f"  log evidence of the task under that prior: {evidence:.4f}")

    # A step size past 1/λ_max implies no Gaussian prior; the error says which one would.
    try:
        implied_prior_covariance(X, noise_scale=sigma, step_size=3 * alpha, steps=k)
    except InadmissibleStepSizeError as err:
        print(f"\nwith α = {3 * alpha:.4g}: {type(err).__name__}")
        print(f"  largest admissible step size: {err.largest_admissible_step_size:.4g}")

    if args.out is not None:
        from hierbayes.experiments.linear import plot_gd_paths

        args.out.mkdir(parents=True, exist_ok=True)
        print(f"\nwrote {plot_gd_paths(args.out / 'gd_paths.png')}")


if __name__ == "__main__":
    main()
