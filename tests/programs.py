"""Plain Pyro programs of every observation family the README lists, as a user writes them.

Each program observes ``y[..., 0]``: its targets are given as ``(T, N, 1)``, the layout a user
with one target column has, while the observed site's values are ``(T, N)``. The data come from
the program's own generative process at a fixed global value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.tasks import TaskBatch

FAMILIES = ("normal", "studentt", "bernoulli", "poisson", "binomial", "categorical")

#: Binomial trials per point, and classes of the categorical program.
TRIALS = 5
CLASSES = 3


def _observation(family: str, eta: Tensor) -> dist.Distribution:
    """The family's distribution of one target at linear predictor ``eta`` (``(..., K)`` for
    the categorical program, ``(...)`` otherwise)."""
    if family == "normal":
        return dist.Normal(eta, 0.5)
    if family == "studentt":
        return dist.StudentT(4.0, eta, 0.5)
    if family == "bernoulli":
        return dist.Bernoulli(logits=eta)
    if family == "poisson":
        return dist.Poisson(rate=torch.exp(eta.clamp(max=5.0)))
    if family == "binomial":
        return dist.Binomial(total_count=TRIALS, logits=eta)
    if family == "categorical":
        return dist.Categorical(logits=eta)
    raise ValueError(family)


def family_program(family: str) -> Callable[..., Any]:
    """``model(x, y=None)``: theta (2,) global, phi (2,) per task (slope and intercept; for the
    categorical program one slope and intercept per class), ``y[..., 0]`` observed."""
    width = 2 * CLASSES if family == "categorical" else 2

    def model(x: Tensor, y: Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(torch.zeros(width), 3.0).to_event(1))
        with pyro.plate("tasks", x.shape[0], dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
            if family == "categorical":
                slope, intercept = phi[..., :CLASSES], phi[..., CLASSES:]
                eta = x[..., 0:1] * slope + intercept  # (T, N, K)
            else:
                eta = x[..., 0] * phi[..., 0] + phi[..., 1]  # (T, N)
            with pyro.plate("data", x.shape[1], dim=-1):
                pyro.sample("y", _observation(family, eta), obs=None if y is None else y[..., 0])

    model.__name__ = f"{family}_program"
    return model


def family_tasks(family: str, T: int = 6, N: int = 8, M: int = 6, *, seed: int = 0) -> TaskBatch:
    """Tasks drawn from the family's program: support and query targets ``(T, N, 1)``."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * CLASSES if family == "categorical" else 2
    theta = 0.5 * torch.randn(width, generator=g)
    phi = theta + 0.5 * torch.randn(T, width, generator=g)
    x = torch.rand(T, N + M, 1, generator=g) * 2 - 1
    if family == "categorical":
        eta = x[..., 0:1] * phi[:, None, :CLASSES] + phi[:, None, CLASSES:]
    else:
        eta = x[..., 0] * phi[:, None, 0] + phi[:, None, 1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        y = _observation(family, eta).sample()
    y = y.to(torch.get_default_dtype()) if family != "categorical" else y
    y = y.unsqueeze(-1)
    return TaskBatch(x[:, :N], y[:, :N], x[:, N:], y[:, N:])
