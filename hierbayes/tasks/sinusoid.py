r"""The sinusoid regression family of Finn et al. (2017), an endless, seeded task source.

Each task draws an amplitude :math:`A \sim U[0.1, 5]` and a phase :math:`p \sim U[0, \pi]`;
its points are :math:`x \sim U[-5, 5]`, :math:`y = A \sin(x + p)` (noise-free unless
``noise_scale > 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hierbayes.tasks.batch import TaskBatch

__all__ = ["SinusoidTasks"]


@dataclass(frozen=True)
class SinusoidTasks:
    r"""Endless source of sinusoid tasks.

    Parameters
    ----------
    shots:
        :math:`K`, support points per task.
    query_shots:
        Query points per task.
    amplitude_range, phase_range, x_range:
        Uniform ranges of :math:`A`, :math:`p` and :math:`x`.
    noise_scale:
        Standard deviation of Gaussian noise added to the targets (0 in the benchmark).
    """

    shots: int = 10
    query_shots: int = 10
    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.shots < 1 or self.query_shots < 0:
            raise ValueError(
                f"shots must be >= 1 and query_shots >= 0; got {self.shots}, {self.query_shots}"
            )

    @property
    def num_tasks(self) -> None:
        """``None``: the family is endless."""
        return None

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        """``num_tasks`` new tasks; ``info`` holds each task's ``amplitude`` and ``phase``."""
        dtype = dtype or torch.get_default_dtype()
        g = generator

        def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
            return torch.rand(shape, generator=g, dtype=dtype) * (high - low) + low

        amplitude = uniform((num_tasks,), *self.amplitude_range)
        phase = uniform((num_tasks,), *self.phase_range)
        n = self.shots + self.query_shots
        x = uniform((num_tasks, n, 1), *self.x_range)
        y = self.function(x, amplitude, phase)
        if self.noise_scale > 0:
            y = y + self.noise_scale * torch.randn(y.shape, generator=g, dtype=dtype)
        query = self.query_shots > 0
        return TaskBatch(
            support_x=x[:, : self.shots],
            support_y=y[:, : self.shots],
            query_x=x[:, self.shots :] if query else None,
            query_y=y[:, self.shots :] if query else None,
            info={"amplitude": amplitude, "phase": phase},
            validate=False,
        )

    @staticmethod
    def function(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        r""":math:`A_j \sin(x + p_j)` for ``x`` ``(T, N, 1)`` and ``amplitude``, ``phase`` ``(T,)``."""
        return amplitude[:, None, None] * torch.sin(x + phase[:, None, None])
