"""Settings of the ``linear`` experiment, and the float64 context every part runs in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["LinearConfig", "float64_default"]


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
def float64_default() -> Iterator[None]:
    """Run in float64 (task collections and models take the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
