r"""Task posteriors held as draws (MCMC) or as Gaussian moments, and what they share.

* :class:`SamplePosterior`: draws :math:`\phi^{(c,s)}_j` of ``C`` Markov chains, ``(C, S, T, D)``,
  with their convergence diagnostics (rank-normalised split :math:`\hat R`, bulk and tail
  effective sample sizes; Vehtari et al. 2021) and the wall time of the run. NUTS returns one
  (:mod:`hierbayes.inference.reference.nuts`). A task whose largest :math:`\hat R` exceeds
  ``rhat_threshold`` (1.01) is listed in :attr:`SamplePosterior.flagged`.
* :class:`GaussianPosterior`: :math:`\mathcal N(\mu_j, \Sigma_j)` per task, e.g. the closed-form
  posterior of the linear-Gaussian model, with sampled or linearised predictions.

Predictions from draws are equal-weight mixtures over the draws (Gaussian likelihood:
:class:`~hierbayes.inference.MixturePrediction`; categorical: the mean of the class
probabilities).

References
----------
1. Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021). Rank-normalization, folding, and
   localization: an improved :math:`\hat R` for assessing convergence of MCMC. Bayesian Analysis.
2. Hoffman & Gelman (2014). The No-U-Turn sampler. JMLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.predictive import (
    CategoricalPrediction,
    GaussianPrediction,
    MixturePrediction,
    Prediction,
    prediction_from_distribution,
)
from hierbayes.models.contract import TaskDensity, model_structure, task_density
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "RHAT_THRESHOLD",
    "GaussianPosterior",
    "PerDrawNoiseMixture",
    "SamplePosterior",
    "linearized_prediction",
    "posterior_draws",
    "predict_from_draws",
    "resolve_density",
    "thinning_index",
]

#: Largest acceptable rank-normalised split :math:`\hat R` (Vehtari et al. 2021).
RHAT_THRESHOLD = 1.01


def resolve_density(model_or_density: Any, tasks: TaskBatch) -> TaskDensity:
    """A :class:`~hierbayes.models.contract.TaskDensity` from a density or a hierbayes model.

    A density (anything with ``log_likelihood``, ``log_prior`` and ``structure``) is returned
    as it is; a model is traced once on ``tasks``' support set (its native density when it
    has one, else :class:`~hierbayes.models.contract.PyroTaskDensity`).
    """
    if all(hasattr(model_or_density, a) for a in ("log_likelihood", "log_prior", "structure")):
        density: TaskDensity = model_or_density
        return density
    if not callable(model_or_density):
        raise TypeError(
            "expected a hierbayes model (a Pyro program model(x, y)) or a TaskDensity; got "
            f"{type(model_or_density).__name__}"
        )
    structure = model_structure(model_or_density, tasks.support_x, tasks.support_y)
    return task_density(model_or_density, structure)


def predict_from_draws(
    density: TaskDensity, params: Mapping[str, Tensor], draws: Tensor, x: Tensor
) -> Prediction:
    r"""The predictive mixture :math:`\frac1S\sum_s p(y\mid\phi^{(s)}_j, x)` at inputs ``x``.

    Parameters
    ----------
    draws:
        ``(S, T, D)`` draws of :math:`\phi`.
    x:
        ``(T, M, *input_shape)`` inputs.

    Returns
    -------
    :class:`~hierbayes.inference.MixturePrediction` (Gaussian likelihood with a noise scale
    shared by the draws) or :class:`~hierbayes.inference.CategoricalPrediction` (mean class
    probabilities).
    """
    S, T, D = draws.shape
    flat = draws.reshape(S * T, D)
    xs = x.unsqueeze(0).expand(S, *x.shape).reshape(S * T, *x.shape[1:])
    with torch.no_grad():
        prediction = prediction_from_distribution(density.predictive(params, flat, xs))
    if isinstance(prediction, CategoricalPrediction):
        probs = prediction.probs.reshape(S, T, *prediction.probs.shape[1:])
        return CategoricalPrediction(probs.mean(0))
    if isinstance(prediction, GaussianPrediction):
        means = prediction.mean.reshape(S, T, *prediction.mean.shape[1:])
        variance = prediction.variance.reshape(S, T, *prediction.variance.shape[1:])
        if bool((variance == variance[:1]).all()):
            return MixturePrediction(means, variance[0])
        return PerDrawNoiseMixture(means, variance)  # e.g. a per-task noise scale in phi
    raise NotImplementedError(f"mixtures of {type(prediction).__name__} are not implemented")


#: Kept as a name: :class:`~hierbayes.inference.posteriors.predictive.MixturePrediction` takes one noise
#: variance per draw itself.
PerDrawNoiseMixture = MixturePrediction


def thinning_index(num_available: int, num: int) -> Tensor:
    """``num`` evenly spaced indices in ``range(num_available)`` (all of them if fewer)."""
    if num >= num_available:
        return torch.arange(num_available)
    return torch.linspace(0, num_available - 1, num).round().long()


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
    rhat_threshold:
        Tasks whose largest :math:`\hat R` exceeds it are :attr:`flagged`.
    settings:
        The sampler's settings, recorded in :meth:`summary`.

    Notes
    -----
    :math:`\hat R` is the rank-normalised split :math:`\hat R` and the effective sample sizes
    the bulk and tail ESS of Vehtari et al. (2021), computed by ArviZ per task and parameter.
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
        self._diagnostics: dict[str, Tensor] | None = None

    @property
    def num_chains(self) -> int:
        return int(self.draws.shape[0])

    @property
    def num_draws(self) -> int:
        """Draws per chain."""
        return int(self.draws.shape[1])

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""``num_samples`` of the pooled draws, ``(num_samples, T, D)``: without replacement
        when there are enough, else with."""
        C, S, T, D = self.draws.shape
        pooled = self.draws.reshape(C * S, T, D)
        if num_samples <= C * S:
            index = torch.randperm(C * S, generator=generator)[:num_samples]
        else:
            index = torch.randint(C * S, (num_samples,), generator=generator)
        return pooled[index.to(pooled.device)]

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
            chosen = self.draws[:, thinning_index(S, per_chain)].reshape(-1, T, D)
        return predict_from_draws(self.density, self.params, chosen, x)

    # -- diagnostics ---------------------------------------------------------------------------

    def diagnostics(self) -> dict[str, Tensor]:
        r"""``{"rhat", "ess_bulk", "ess_tail"}``, each ``(T, D)`` (computed once, by ArviZ)."""
        if self._diagnostics is None:
            from hierbayes.inference.evaluation.arviz_bridge import convergence_diagnostics

            found = convergence_diagnostics(self.draws.cpu().numpy())
            self._diagnostics = {k: torch.tensor(np.array(v)) for k, v in found.items()}
        return self._diagnostics

    @property
    def rhat_max(self) -> Tensor:
        r"""Largest :math:`\hat R` over parameters, ``(T,)`` (NaN when a chain is constant)."""
        rhat = self.diagnostics()["rhat"]
        nan = torch.isnan(rhat).any(-1)
        return torch.where(nan, torch.full_like(rhat[:, 0], math.nan), rhat.nan_to_num(0).amax(-1))

    @property
    def ess_bulk_min(self) -> Tensor:
        """Smallest bulk effective sample size over parameters, ``(T,)``."""
        return self.diagnostics()["ess_bulk"].amin(-1)

    @property
    def flagged(self) -> list[int]:
        r"""Tasks (indices) whose :math:`\hat R` exceeds :attr:`rhat_threshold`, or is NaN."""
        rhat = self.rhat_max
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
            "rhat_max": _floats(self.rhat_max),
            "ess_bulk_min": _floats(self.ess_bulk_min),
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


class GaussianPosterior(TaskPosterior):
    r""":math:`\mathcal N(\mu_j, \Sigma_j)` for each task.

    Parameters
    ----------
    density, params:
        The task density and the global values.
    mean:
        ``(T, D)``.
    covariance:
        ``(T, D, D)``, symmetric positive (semi-)definite.
    predict_method:
        Default of :meth:`predict`: ``"sampled"`` (a mixture over draws) or ``"linearized"``
        (:math:`\mathcal N(f(x;\mu_j), J\Sigma_j J^\top + \sigma^2)` with :math:`J` the Jacobian
        of the predictive mean at :math:`\mu_j`; exact when the model is linear in
        :math:`\phi`).
    wall_time:
        Seconds it took to compute, reported by the comparison.
    """

    def __init__(
        self,
        density: TaskDensity,
        params: Mapping[str, Tensor],
        mean: Tensor,
        covariance: Tensor,
        *,
        predict_method: str = "sampled",
        wall_time: float = math.nan,
    ) -> None:
        super().__init__(density, params, mean)
        T, D = self.mean.shape
        if covariance.shape != (T, D, D):
            raise ValueError(
                f"covariance must have shape ({T}, {D}, {D}) to match mean {(T, D)}; got "
                f"{tuple(covariance.shape)}"
            )
        _check_method(predict_method)
        self._covariance = covariance.detach()
        self.predict_method = predict_method
        self.wall_time = float(wall_time)
        self._tril: Tensor | None = None

    def covariance(self) -> Tensor:
        r""":math:`\Sigma_j`, ``(T, D, D)``."""
        return self._covariance

    @property
    def scale_tril(self) -> Tensor:
        r"""A square root :math:`L_j L_j^\top = \Sigma_j`, ``(T, D, D)`` (Cholesky, or a
        symmetric eigen-square-root when :math:`\Sigma_j` is only semi-definite)."""
        if self._tril is None:
            self._tril = covariance_factor(self._covariance)
        return self._tril

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(
            (num_samples, *self.mean.shape),
            generator=generator,
            dtype=self.mean.dtype,
            device=self.mean.device,
        )
        return self.transform_noise(z)

    def transform_noise(self, z: Tensor) -> Tensor:
        r""":math:`\mu_j + L_j z_{sj}` for standard normal ``z`` ``(S, T, D)``."""
        return self.mean + torch.einsum("tij,stj->sti", self.scale_tril, z)

    def predict(
        self,
        x: Tensor,
        *,
        method: str | None = None,
        num_samples: int = 400,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> Prediction:
        """Predictive distribution at ``x`` ``(T, M, ...)``: ``method`` ``"sampled"`` (a mixture
        over ``num_samples`` draws) or ``"linearized"`` (Gaussian likelihoods only)."""
        method = self.predict_method if method is None else method
        _check_method(method)
        if method == "sampled":
            if generator is None:
                generator = torch.Generator(device=self.mean.device).manual_seed(0)
            return predict_from_draws(
                self.density, self.params, self.sample(num_samples, generator=generator), x
            )
        return linearized_prediction(
            self.density, self.params, self.mean, x, lambda J, t: _quad(J, self.covariance()[t])
        )


def _quad(J: Tensor, covariance: Tensor) -> Tensor:
    r"""``diag(J Σ Jᵀ)`` for ``J`` ``(K, D)``."""
    return torch.einsum("kd,de,ke->k", J, covariance, J)


def _check_method(method: str) -> None:
    if method not in ("sampled", "linearized"):
        raise ValueError(f"predict method must be 'sampled' or 'linearized'; got {method!r}")


def linearized_prediction(
    density: TaskDensity,
    params: Mapping[str, Tensor],
    mean: Tensor,
    x: Tensor,
    output_variance: Callable[[Tensor, int], Tensor],
) -> GaussianPrediction:
    r"""The linearised predictive :math:`\mathcal N(f(x;\mu_j), \operatorname{diag}(J_j\Sigma_j
    J_j^\top) + \sigma^2)` of a Gaussian likelihood.

    ``output_variance(J, t)`` returns the diagonal of :math:`J\Sigma_t J^\top` for the Jacobian
    ``J`` ``(M·C, D)`` of task ``t``'s predictive means at :math:`\mu_t`.
    """
    with torch.no_grad():
        at_mean = prediction_from_distribution(density.predictive(params, mean, x))
    if not isinstance(at_mean, GaussianPrediction):
        raise NotImplementedError(
            "the linearised predictive needs a Gaussian likelihood; use method='sampled'"
        )
    extra = torch.empty_like(at_mean.mean)
    for t in range(mean.shape[0]):

        def f(phi: Tensor, t: int = t) -> Tensor:
            out = prediction_from_distribution(density.predictive(params, phi[None], x[t : t + 1]))
            return out.mean.reshape(-1)

        J = torch.autograd.functional.jacobian(f, mean[t])
        extra[t] = output_variance(J, t).reshape(at_mean.mean.shape[1:])
    return GaussianPrediction(at_mean.mean, at_mean.variance + extra)


def covariance_factor(covariance: Tensor) -> Tensor:
    r"""``L`` with :math:`LL^\top = \Sigma`, batched: Cholesky where it succeeds, else the
    symmetric square root :math:`V\sqrt{\max(\Lambda, 0)}V^\top` (semi-definite input)."""
    tril, info = torch.linalg.cholesky_ex(covariance)
    if bool((info == 0).all()):
        return tril
    evals, evecs = torch.linalg.eigh(covariance)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2) @ evecs.transpose(-1, -2)


def posterior_draws(
    posterior: TaskPosterior, num_chains: int, num_draws: int, *, seed: int = 0
) -> Tensor:
    r"""Draws of :math:`\phi` grouped as chains, ``(C, S, T, D)``, for the ArviZ bridge.

    * :class:`SamplePosterior`: its own chains, each thinned to ``num_draws`` evenly spaced
      draws (``num_chains`` is ignored: the chains are the sampler's).
    * A Gaussian posterior, one with ``transform_noise(z)`` (:class:`GaussianPosterior`,
      :class:`~hierbayes.inference.reference.meanfield.MeanFieldPosterior`) or a ``covariance()`` method
      (Laplace): :math:`\mu_j + L_j z` with :math:`z` standard normal from a generator seeded
      with ``seed`` (:math:`L_j` the Cholesky factor of the covariance). Every Gaussian
      posterior of the same size thus uses the *same* :math:`z` (common random numbers), so
      equal Gaussians give equal draws and equal comparison rows.
    * Any other posterior: ``posterior.sample(C·S, generator)`` cut into ``C`` "chains" of
      independent draws.
    """
    if isinstance(posterior, SamplePosterior):
        return posterior.draws[:, thinning_index(posterior.num_draws, num_draws)]
    T, D = posterior.mean.shape
    n = num_chains * num_draws
    mean = posterior.mean
    generator = torch.Generator(device=mean.device).manual_seed(seed)

    def noise() -> Tensor:
        return torch.randn((n, T, D), generator=generator, dtype=mean.dtype, device=mean.device)

    flat: Tensor | None = None
    transform = getattr(posterior, "transform_noise", None)
    if callable(transform):
        flat = transform(noise())
    elif callable(getattr(posterior, "covariance", None)):
        try:
            covariance = posterior.covariance()  # type: ignore[attr-defined]
        except NotImplementedError:
            covariance = None
        if covariance is not None:
            factor = covariance_factor(covariance.to(mean))
            flat = mean + torch.einsum("tij,stj->sti", factor, noise())
    if flat is None:
        flat = posterior.sample(n, generator=generator)
    return flat.reshape(num_chains, num_draws, T, D)


def as_numpy(value: Tensor) -> np.ndarray:
    """A detached CPU NumPy copy."""
    return np.asarray(value.detach().cpu().numpy())
