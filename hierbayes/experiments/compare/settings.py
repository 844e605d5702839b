"""Sizes of one ``python -m hierbayes compare`` run, and the seed of its held-out tasks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["HELDOUT_SEED", "CompareSettings"]

#: Seed of the held-out tasks (the same for every run of the command).
HELDOUT_SEED = 20180430


@dataclass
class CompareSettings:
    """Sizes of one ``compare`` run (defaults: a few minutes on two CPU cores)."""

    seed: int = 0
    tasks: int = 3
    num_samples: int = 300
    num_chains: int = 4
    draws_per_chain: int = 200
    meanfield_steps: int = 2000
    # linear problem (both NUTS engines: num_samples warm-up steps and draws, num_chains chains)
    linear_input_dim: int = 3
    linear_shots: int = 5
    linear_query: int = 20
    linear_train_tasks: int = 200
    linear_meta_steps: int = 300
    linear_noise: float = 0.5
    # sinusoid problem (NumPyro: sinusoid_num_samples; Pyro: a shorter run, module docstring)
    sinusoid_shots: int = 10
    sinusoid_query: int = 20
    sinusoid_meta_steps: int = 2000
    sinusoid_tasks: int | None = 2
    sinusoid_num_samples: int = 150
    sinusoid_pyro_samples: int = 25
    sinusoid_pyro_chains: int = 2
    sinusoid_max_tree_depth: int = 10
    progress: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> CompareSettings:
        """Seconds-long sizes for tests."""
        base = cls(
            tasks=2,
            num_samples=60,
            num_chains=2,
            draws_per_chain=30,
            meanfield_steps=100,
            linear_train_tasks=50,
            linear_meta_steps=20,
            sinusoid_meta_steps=10,
            sinusoid_tasks=1,
            sinusoid_query=10,
            sinusoid_num_samples=30,
            sinusoid_pyro_samples=10,
            sinusoid_max_tree_depth=4,
        )
        return replace(base, **overrides)
