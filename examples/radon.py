"""Minnesota radon, counties as tasks: the contextual-effects model as a plain Pyro program,
fitted by empirical Bayes (type-II MAP of the exact marginal likelihood), then each county's
posterior at the fitted hyperparameters.

    log_radon_i ~ N(alpha_county(i) + w1 log_uranium + w2 floor_i + w3 floor_by_county, sigma)
    alpha_j ~ N(mu, tau);  mu, w ~ N(0, 1);  tau, sigma ~ HalfNormal(1)

All of each county's houses are its support set and there is no query set; the Laplace
evidence of a linear-Gaussian group is its exact marginal likelihood, and fit minimises it
over all 85 counties with L-BFGS. Run: ``.venv/bin/python examples/radon.py`` (seconds).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.inference import fit
from hierbayes.tasks import radon_tasks

torch.set_default_dtype(torch.float64)


def model(x: Tensor, y: Tensor | None = None) -> None:
    """x: (counties, houses, 3) = (log_uranium, floor, floor_by_county); y: (counties, houses)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))  # (counties, 1)
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(alpha + x @ w, sigma), obs=y)


def main(meta_steps: int = 200) -> dict[str, Tensor]:
    tasks = radon_tasks()
    result = fit(model, tasks, method="llama", objective="evidence", meta_steps=meta_steps)
    p = result.params
    print(f"{result.convergence}")
    print(f"mu {float(p['mu']):.3f}  tau {float(p['tau']):.3f}  sigma {float(p['sigma']):.3f}")
    print(f"w (log_uranium, floor, floor_by_county) {p['w'].numpy().round(3)}")
    posterior = result.adapt(tasks.batch())  # N(mode, H^-1) per county, at the fitted globals
    sd = posterior.covariance().reshape(-1).sqrt()
    for j in (0, 1, int(tasks.group_sizes.argmax())):
        print(
            f"{tasks.group_names[j]:>10s} ({int(tasks.group_sizes[j]):3d} houses): "
            f"alpha {float(posterior.mean[j]):.3f} ± {float(sd[j]):.3f}"
        )
    return p


if __name__ == "__main__":
    main()
