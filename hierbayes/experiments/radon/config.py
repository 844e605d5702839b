r"""Settings of the ``radon`` experiment, and which model site each reported quantity is."""

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
    r"""Settings of the ``radon`` experiment.

    The defaults take 2 to 3½ minutes on one CPU core, nearly all of it NUTS (measured on
    this project's shared 2-core machine: 129 s, of which NUTS' 4 chains × (300 warm-up + 300
    draws) 106 s, hyper-Laplace's 2,000 draws 21 s, empirical Bayes 2 s; 205 s under load);
    :meth:`quick` takes about 15 seconds. In the model's centred parametrisation
    a NUTS chain can stick in the funnel of small :math:`\tau` (with seed 0, 500 + 500 draws
    left one chain at :math:`\tau \approx 0.05` with 307 divergences, :math:`\hat R` 1.43;
    ``target_accept_prob=0.95`` removed that at twice the time, :math:`\hat R` 1.09): the
    diagnostics in ``metrics.json`` and the report say when the reference is not to be trusted.

    Attributes
    ----------
    seed:
        Seeds ``fit``, the draws of hyper-Laplace's nodes and NUTS.
    num_warmup, num_samples, num_chains, target_accept_prob:
        NUTS' adaptation steps, kept draws per chain, chains and step-size adaptation target
        (higher: smaller steps, fewer divergences in the funnel, longer trees).
    hyper_nodes:
        Importance-weighted draws over the globals for hyper-Laplace (the README's 2,000).
    progress:
        Show ``fit``'s progress bar.
    """

    seed: int = 0
    num_warmup: int = 300
    num_samples: int = 300
    num_chains: int = 4
    target_accept_prob: float = 0.8
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
        if not 0.0 < self.target_accept_prob < 1.0:
            raise ValueError(
                f"RadonConfig.target_accept_prob must lie in (0, 1); got {self.target_accept_prob}"
            )
        if self.hyper_nodes < 2:
            raise ValueError(
                f"RadonConfig.hyper_nodes must be at least 2 draws; got {self.hyper_nodes}"
            )
