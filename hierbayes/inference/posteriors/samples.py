r"""Task posteriors held as the draws of Markov chains, with their convergence diagnostics.

:class:`SamplePosterior` holds draws :math:`\phi^{(c,s)}_j` of ``C`` chains, ``(C, S, T, D)``,
the wall time of the run and the chains' convergence diagnostics (rank-normalised split
:math:`\hat R`, bulk and tail effective sample sizes; Vehtari et al. 2021). The samplers of
:mod:`hierbayes.inference.references.nuts` return one with its diagnostics attached; for draws
of your own, pass ``diagnostics=convergence_diagnostics(draws)``
(:func:`hierbayes.inference.diagnostics.arviz_bridge.convergence_diagnostics`). A task whose
largest :math:`\hat R` exceeds ``rhat_threshold`` (1.01) is listed in
:attr:`SamplePosterior.flagged`. Its predictive is the equal-weight mixture over the draws
(:func:`~hierbayes.inference.posteriors.mixture.predict_from_draws`).

References
----------
1. Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021). Rank-normalization, folding, and
   localization: an improved :math:`\hat R` for assessing convergence of MCMC. Bayesian Analysis.
2. Hoffman & Gelman (2014). The No-U-Turn sampler. JMLR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.mixture import predict_from_draws
from hierbayes.inference.predictions import Prediction
from hierbayes.models.density import TaskDensity

__all__ = [
    "DIAGNOSTICS",
    "RHAT_THRESHOLD",
    "SamplePosterior",
    "thinning_index",
]

#: Largest acceptable rank-normalised split :math:`\hat R` (Vehtari et al. 2021).
RHAT_THRESHOLD = 1.01

#: The convergence diagnostics a :class:`SamplePosterior` holds, each ``(T, D)``.
DIAGNOSTICS = ("rhat", "ess_bulk", "ess_tail")


def thinning_index(num_available: int, num: int, device: torch.device | None = None) -> Tensor:
    """``num`` evenly spaced indices in ``range(num_available)`` (all of them if fewer)."""
    if num >= num_available:
        return torch.arange(num_available, device=device)
    return torch.linspace(0, num_available - 1, num, device=device).round().long()


class SamplePosterior(TaskPosterior):
    r"""Draws of :math:`\phi_j` from ``C`` Markov chains per task, with diagnostics.

    Parameters
    ----------
    density, params:
        The task density and the global values the chains targeted
        :math:`p(\phi_j\mid\mathcal D^s_j, \hat\theta)` with.
    draws:
        ``(C, S, T, D)``: chain, draw, task, parameter.
    wall_time:
        Seconds the sampler took for all tasks and chains (warm-up and compilation included).
    engine:
        Who drew them (``"pyro"``, ``"numpyro"``).
    sampler_stats:
        Optional per-draw statistics, each ``(C, S, T)`` (``diverging``, ``num_steps``).
    diagnostics:
        ``{"rhat", "ess_bulk", "ess_tail"}``, each ``(T, D)``: the rank-normalised split
        :math:`\hat R` and the bulk and tail ESS of Vehtari et al. (2021) per task and
        parameter, as :func:`~hierbayes.inference.diagnostics.arviz_bridge.convergence_diagnostics`
        computes them. The samplers attach them; without them :meth:`diagnostics` and what
        reads it raise.
    rhat_threshold:
        Tasks whose largest :math:`\hat R` exceeds it are :attr:`flagged`.
    settings:
        The sampler's settings, recorded in :meth:`summary`.
    """

    def __init__(
        self,
        density: TaskDensity,
        params: Mapping[str, Tensor],
        draws: Tensor,
        *,
        wall_time: float = math.nan,
        engine: str = "",
        sampler_stats: Mapping[str, Tensor] | None = None,
        diagnostics: Mapping[str, Tensor] | None = None,
        rhat_threshold: float = RHAT_THRESHOLD,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if draws.dim() != 4:
            raise ValueError(
                "draws must have shape (chains, draws, tasks, parameters); got "
                f"{tuple(draws.shape)}"
            )
        super().__init__(density, params, draws.mean(dim=(0, 1)))
        self.draws = draws.detach()
        self.wall_time = float(wall_time)
        self.engine = engine
        self.sampler_stats = {k: v.detach() for k, v in (sampler_stats or {}).items()}
        self.rhat_threshold = rhat_threshold
        self.settings = dict(settings or {})
        self._diagnostics = None if diagnostics is None else self._checked(diagnostics)

    def _checked(self, diagnostics: Mapping[str, Tensor]) -> dict[str, Tensor]:
        shape = tuple(self.mean.shape)
        missing = [k for k in DIAGNOSTICS if k not in diagnostics]
        if missing:
            raise ValueError(f"diagnostics need {list(DIAGNOSTICS)}; missing {missing}")
        found = {k: torch.as_tensor(diagnostics[k]) for k in DIAGNOSTICS}
        for key, value in found.items():
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"diagnostics[{key!r}] must be (tasks, parameters) = {shape}; got "
                    f"{tuple(value.shape)}"
                )
        return found

    @property
    def num_chains(self) -> int:
        return int(self.draws.shape[0])

    @property
    def num_draws(self) -> int:
        """Draws per chain."""
        return int(self.draws.shape[1])

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""``num_samples`` of the pooled draws, ``(num_samples, T, D)``: without replacement
        when there are enough, else with. The indices are drawn on the draws' device from
        ``generator`` (which must live there), or from the device's global generator."""
        C, S, T, D = self.draws.shape
        pooled = self.draws.reshape(C * S, T, D)
        device = self.draws.device
        if num_samples <= C * S:
            index = torch.randperm(C * S, generator=generator, device=device)[:num_samples]
        else:
            index = torch.randint(C * S, (num_samples,), generator=generator, device=device)
        return pooled[index]

    def predict(
        self,
        x: Tensor,
        *,
        num_samples: int | None = None,
        **kwargs: object,
    ) -> Prediction:
        r"""The mixture over draws at inputs ``x`` ``(T, M, ...)``: every draw (default), or
        ``num_samples`` evenly spaced draws, shared equally by the chains."""
        C, S, T, D = self.draws.shape
        if num_samples is None:
            chosen = self.draws.reshape(C * S, T, D)
        else:
            per_chain = max(1, math.ceil(num_samples / C))
            index = thinning_index(S, per_chain, self.draws.device)
            chosen = self.draws[:, index].reshape(-1, T, D)
        return predict_from_draws(self.density, self.params, chosen, x)

    # -- diagnostics ---------------------------------------------------------------------------

    def marginal_variance(self) -> Tensor:
        """The variance of the draws of every chain, ``(T, D)``."""
        return self.draws.reshape(-1, *self.draws.shape[2:]).var(0)

    @property
    def has_diagnostics(self) -> bool:
        """Whether convergence diagnostics are attached."""
        return self._diagnostics is not None

    def with_diagnostics(self, diagnostics: Mapping[str, Tensor]) -> SamplePosterior:
        """The same draws with ``diagnostics`` attached (see the class parameters)."""
        return SamplePosterior(
            self.density,
            self.params,
            self.draws,
            wall_time=self.wall_time,
            engine=self.engine,
            sampler_stats=self.sampler_stats,
            diagnostics=diagnostics,
            rhat_threshold=self.rhat_threshold,
            settings=self.settings,
        )

    def diagnostics(self) -> dict[str, Tensor]:
        r"""``{"rhat", "ess_bulk", "ess_tail"}``, each ``(T, D)``."""
        if self._diagnostics is None:
            raise ValueError(
                "this SamplePosterior carries no convergence diagnostics; the samplers attach "
                "them. For draws of your own pass diagnostics=convergence_diagnostics(draws) "
                "(hierbayes.inference.diagnostics.arviz_bridge), or call "
                "posterior.with_diagnostics(...)"
            )
        return dict(self._diagnostics)

    @property
    def rhat_max_per_task(self) -> Tensor:
        r"""Largest :math:`\hat R` over each task's parameters, ``(T,)`` (NaN when a chain is
        constant)."""
        rhat = self.diagnostics()["rhat"]
        nan = torch.isnan(rhat).any(-1)
        return torch.where(nan, torch.full_like(rhat[:, 0], math.nan), rhat.nan_to_num(0).amax(-1))

    @property
    def rhat_max(self) -> float:
        r"""The largest :math:`\hat R` of the posterior, a number (NaN when some chain is
        constant); per task in :attr:`rhat_max_per_task`."""
        return _worst(self.rhat_max_per_task)

    @property
    def ess_bulk_min_per_task(self) -> Tensor:
        """Smallest bulk effective sample size over each task's parameters, ``(T,)``."""
        return self.diagnostics()["ess_bulk"].amin(-1)

    @property
    def ess_bulk_min(self) -> float:
        """The smallest bulk effective sample size of the posterior, a number; per task in
        :attr:`ess_bulk_min_per_task`."""
        return float(self.ess_bulk_min_per_task.min())

    @property
    def flagged(self) -> list[int]:
        r"""Tasks (indices) whose :math:`\hat R` exceeds :attr:`rhat_threshold`, or is NaN."""
        rhat = self.rhat_max_per_task
        bad = torch.isnan(rhat) | (rhat > self.rhat_threshold)
        return [int(i) for i in bad.nonzero().flatten()]

    @property
    def converged(self) -> bool:
        """No task is :attr:`flagged`."""
        return not self.flagged

    def summary(self) -> dict[str, Any]:
        """Plain data: engine, wall time, draws, per-task diagnostics and ESS per second."""
        diag = self.diagnostics()
        ess_bulk = diag["ess_bulk"]
        out: dict[str, Any] = {
            "engine": self.engine,
            "wall_time": self.wall_time,
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
            "rhat_threshold": self.rhat_threshold,
            "rhat_max": self.rhat_max,
            "rhat_max_per_task": _floats(self.rhat_max_per_task),
            "ess_bulk_min": self.ess_bulk_min,
            "ess_bulk_min_per_task": _floats(self.ess_bulk_min_per_task),
            "ess_bulk_median": _floats(ess_bulk.median(-1).values),
            "ess_tail_min": _floats(diag["ess_tail"].amin(-1)),
            "flagged": self.flagged,
            "settings": dict(self.settings),
        }
        if self.wall_time > 0 and math.isfinite(self.wall_time):
            out["ess_bulk_min_per_second"] = float(ess_bulk.amin(-1).min()) / self.wall_time
            out["ess_bulk_median_per_second"] = float(ess_bulk.median()) / self.wall_time
        if "diverging" in self.sampler_stats:
            divergent = self.sampler_stats["diverging"].to(torch.int64).sum(dim=(0, 1))
            out["divergences"] = [int(v) for v in divergent]
        if "num_steps" in self.sampler_stats:
            out["mean_num_steps"] = _floats(
                self.sampler_stats["num_steps"].double().mean(dim=(0, 1))
            )
        return out


def _floats(values: Tensor) -> list[float]:
    return [float(v) for v in values.flatten()]


def _worst(rhat: Tensor) -> float:
    r"""The largest of some :math:`\hat R` values, NaN if any is."""
    if rhat.numel() == 0:
        return math.nan
    return math.nan if bool(torch.isnan(rhat).any()) else float(rhat.max())
