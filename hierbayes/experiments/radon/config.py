"""Settings of the ``radon`` experiment, and which model site each reported quantity is."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hierbayes.inference.references.chains import check_counts

__all__ = ["HYPERPARAMETERS", "WEIGHT_FEATURES", "RadonConfig"]

#: Each reported hyperparameter and the global sample site of
#: :class:`~hierbayes.models.ContextualEffects` it is: the mean :math:`\mu` and scale
#: :math:`\tau` of the county intercepts :math:`\alpha_j \sim \mathcal N(\mu, \tau^2)`, the
#: weights :math:`(w_1, w_2, w_3)` and the house-level noise scale :math:`\sigma`.
HYPERPARAMETERS = {
    "county_effect_mean": "mu",
    "county_effect_scale": "tau",
    "weights": "w",
    "noise_scale": "sigma",
}
#: The column each entry of ``weights`` multiplies (:data:`~hierbayes.tasks.grouped.CONTEXTUAL_FEATURES`).
WEIGHT_FEATURES = ("log_uranium", "floor", "floor_by_county")


@dataclass(frozen=True)
class RadonConfig:
    """Settings of the ``radon`` experiment.

    The defaults take about four minutes on one CPU core, nearly all of it NUTS
    (4 chains × (500 warm-up + 500 draws)); :meth:`quick` takes about 20 seconds.

    Attributes
    ----------
    seed:
        Seeds ``fit``, the draws of hyper-Laplace's nodes and NUTS.
    num_warmup, num_samples, num_chains:
        NUTS' adaptation steps, kept draws per chain and chains.
    hyper_nodes:
        Importance-weighted draws over the globals for hyper-Laplace (the README's 2,000).
    progress:
        Show ``fit``'s progress bar.
    """

    seed: int = 0
    num_warmup: int = 500
    num_samples: int = 500
    num_chains: int = 4
    hyper_nodes: int = 2000
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> RadonConfig:
        """Seconds-long sizes for the tests: NUTS 2 chains × (30 + 30), 200 nodes."""
        small = cls(num_warmup=30, num_samples=30, num_chains=2, hyper_nodes=200)
        return replace(small, **overrides)

    def __post_init__(self) -> None:
        """Check the sizes before any work is done (NUTS runs last)."""
        check_counts(self.num_warmup, self.num_samples, self.num_chains)
        if self.num_samples * self.num_chains < 2:
            raise ValueError(
                "NUTS needs at least 2 draws in all for a county's sd; got num_samples="
                f"{self.num_samples} x num_chains={self.num_chains}"
            )
        if self.hyper_nodes < 2:
            raise ValueError(
                f"RadonConfig.hyper_nodes must be at least 2 draws; got {self.hyper_nodes}"
            )
