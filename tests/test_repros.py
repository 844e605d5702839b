"""Regression tests for the reproductions in ../shared/repros (issues 9 and 10) that no other
test file holds: each asserts the fixed behaviour."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.inference import fit
from hierbayes.tasks import TaskCollection


def studentt_model(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        b = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        with pyro.plate("data", x.shape[1], dim=-1):
            loc = x[..., 0] * b[..., 0] + b[..., 1]
            pyro.sample("y", dist.StudentT(4.0, loc, 0.5), obs=None if y is None else y[..., 0])


def studentt_tasks() -> TaskCollection:
    rng = np.random.default_rng(0)
    return TaskCollection(
        [
            (
                rng.standard_normal((8, 1)),
                3 * rng.standard_normal((8, 1)),
                rng.standard_normal((5, 1)),
                rng.standard_normal((5, 1)),
            )
            for _ in range(30)
        ]
    )


def test_repro_09_a_repeated_warning_is_issued_once_with_its_count_and_its_advice_works() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(
            studentt_model,
            studentt_tasks(),
            method="llama",
            objective="evidence",
            curvature="full",
            meta_steps=40,
            progress=False,
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(set(messages)), messages  # each distinct warning once
    repaired = [m for m in messages if "not positive definite" in m]
    # fired at many steps (repro: ~50 times in 200): shown when it first happened, and once
    # more at the end with its count
    assert len(repaired) == 2
    assert "curvature='ggn'" in repaired[0] and "times in this run" in repaired[1]
    with warnings.catch_warnings():  # the advice is one a plain program can follow
        warnings.simplefilter("ignore")
        result = fit(
            studentt_model,
            studentt_tasks(),
            method="llama",
            objective="evidence",
            curvature="ggn",
            meta_steps=3,
            progress=False,
        )
    assert bool(torch.isfinite(result.theta).all())


def readme_model(x: Tensor, y: Tensor | None = None) -> None:
    """The README's own model: it observes y[..., 0], without the trailing output dimension."""
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("tasks", x.shape[0], dim=-2):
        phi = pyro.sample("phi", dist.Normal(theta, 1.0).to_event(1))
        mean = x[..., 0] * phi[..., 0] + phi[..., 1]
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(mean, 0.5), obs=None if y is None else y[..., 0])


def test_repro_01_the_readme_model_converts_to_inference_data() -> None:
    from hierbayes.inference.diagnostics import to_inference_data
    from hierbayes.tasks import SinusoidTasks

    tasks = SinusoidTasks(shots=10, query_shots=10)
    result = fit(readme_model, tasks, meta_steps=5, step_size=0.002, progress=False)
    heldout = tasks.sample(3, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ's 1.0 notice
        idata = to_inference_data(result.adapt(heldout), heldout, num_draws=20, num_chains=2)
    assert "posterior" in idata.groups()
    assert len(idata.posterior.chain) == 2 and len(idata.posterior.draw) == 20
