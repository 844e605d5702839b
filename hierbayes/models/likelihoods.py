r"""Observation models :math:`p(y \mid f)` for network outputs :math:`f = f(x; \phi)`.

Each likelihood gives the Pyro distribution used at the model's observed site and a closed-form
log density used by the fast path; the tests check they agree. For the generalised
Gauss--Newton curvature each also gives :math:`\Lambda`, the Hessian of :math:`-\log p(y\mid f)`
with respect to :math:`f`, and a factor :math:`L` with :math:`\Lambda = LL^\top` (Martens 2020;
MATH.md §4).

A likelihood may own **per-task parameters** appended to :math:`\phi_j` (the Gaussian's
per-task log noise scale): they get a prior around a mean stored in :math:`\theta`, are
adapted by the inner loop with the network's weights, and enter the Laplace curvature through
their Fisher information.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pyro.distributions as dist
import torch
from torch import Tensor

from hierbayes.errors import TaskDataError

__all__ = ["CategoricalLikelihood", "GaussianLikelihood", "Likelihood", "LikelihoodSpec"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class LikelihoodSpec:
    r"""What a likelihood computes, as data: enough to write its log density in any backend.

    ``kind`` ``"gaussian"``: :math:`\mathcal N(y; f, \sigma^2)` per value, with ``noise``
    ``"fixed"`` (:math:`\sigma` = ``noise_scale``), ``"learned"`` (the global ``noise_scale``)
    or ``"per_task"`` (:math:`\log\sigma_j` the task's first likelihood parameter in
    :math:`\phi_j`). ``kind`` ``"categorical"``: :math:`\log\mathrm{softmax}(f)_y`, ``noise``
    ``"none"``.
    """

    kind: Literal["gaussian", "categorical"]
    noise: Literal["none", "fixed", "learned", "per_task"] = "none"
    noise_scale: float = 1.0


class Likelihood(ABC):
    """Observation model with optional global latents and per-task parameters of its own."""

    #: Whether targets are class labels (integer, one per point) or real vectors.
    is_classification: bool = False
    #: Whether :meth:`noise_variance` gives the Gaussian observation-noise variance.
    noise_variance_known: bool = False
    #: Number of per-task parameters appended to each task's :math:`\phi_j`.
    num_task_params: int = 0
    #: Prior scale of those parameters around their mean in :math:`\theta`.
    task_param_prior_scale: float = 1.0

    @property
    def spec(self) -> LikelihoodSpec | None:
        """What this likelihood computes, as data, for backends that write its density
        themselves (the JAX density); ``None`` for a likelihood without one. A subclass that
        changes the density must change (or drop) its spec too."""
        return None

    def global_priors(self) -> dict[str, dist.Distribution]:
        """Hyperpriors of the likelihood's own global latents, by site name."""
        return {}

    def initial_values(self) -> dict[str, Tensor]:
        """Where the guide starts each of those latents."""
        return {}

    def task_param_init(self) -> Tensor:
        """Initial mean of the per-task parameters, ``(num_task_params,)``."""
        return torch.zeros(self.num_task_params)

    def with_task_params(
        self, params: Mapping[str, Tensor], task_params: Tensor
    ) -> Mapping[str, Tensor]:
        """``params`` completed with the per-task parameters ``(T, k)`` of a batch."""
        return params

    def task_param_curvature(
        self, f: Tensor, params: Mapping[str, Tensor], mask: Tensor | None
    ) -> Tensor:
        """Fisher information of the per-task parameters, diagonal, ``(T, k)``."""
        return f.new_zeros(f.shape[0], 0)

    @abstractmethod
    def check_targets(self, f: Tensor, y: Tensor) -> None:
        """Raise :class:`~hierbayes.errors.TaskDataError` if ``y`` cannot be scored against ``f``."""

    @abstractmethod
    def distribution(self, f: Tensor, params: Mapping[str, Tensor]) -> dist.Distribution:
        r""":math:`p(y \mid f)` with batch shape ``f.shape[:2]`` = ``(T, N)``."""

    @abstractmethod
    def log_prob(self, f: Tensor, y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r"""Closed-form :math:`\log p(y_n \mid f_n)`, shape ``(T, N)``."""

    def log_prob_sum(
        self, f: Tensor, y: Tensor, params: Mapping[str, Tensor], mask: Tensor | None = None
    ) -> Tensor:
        r""":math:`\sum_n \log p(y_n \mid f_n)` per task, ``(T,)``, over unmasked points."""
        lp = self.log_prob(f, y, params)
        if mask is not None:
            lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
        return lp.sum(-1)

    @abstractmethod
    def output_precision(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r""":math:`\Lambda_n = -\nabla_f^2 \log p(y_n\mid f_n)`, shape ``(T, N, C, C)``.

        For these likelihoods it does not depend on :math:`y`, so it is also the Fisher.
        """

    @abstractmethod
    def output_factor(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r"""A factor :math:`L_n` with :math:`\Lambda_n = L_n L_n^\top`, shape ``(T, N, C, K)``."""

    def noise_variance(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r"""Observation-noise variance shaped like ``f`` (where ``noise_variance_known``)."""
        raise NotImplementedError(f"{self!r} has no Gaussian observation noise")


class GaussianLikelihood(Likelihood):
    r""":math:`y_n \sim \mathcal N(f_n, \sigma^2 I)`.

    Parameters
    ----------
    noise_scale:
        :math:`\sigma`, or its initial value when learned.
    learned:
        Make :math:`\sigma` a global latent ``noise_scale`` with hyperprior
        :math:`\log\sigma \sim \mathcal N(\log\sigma_0, 1)`, point-estimated with
        :math:`\theta` (type-II MAP), so that predictive intervals are honest.
    per_task:
        Give every task its own noise scale instead: :math:`\log\sigma_j` is appended to
        :math:`\phi_j` with prior :math:`\mathcal N(\bar\theta_\sigma, s_\sigma^2)`, its mean
        :math:`\bar\theta_\sigma` the last entry of :math:`\theta`. The inner loop adapts it to
        the task's support residuals, so a task's predictive widens with its own misfit.
    per_task_prior_scale:
        :math:`s_\sigma`.
    """

    noise_variance_known = True

    def __init__(
        self,
        noise_scale: float = 1.0,
        *,
        learned: bool = True,
        per_task: bool = False,
        per_task_prior_scale: float = 0.5,
    ) -> None:
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive; got {noise_scale}")
        if per_task and not per_task_prior_scale > 0:
            raise ValueError(f"per_task_prior_scale must be positive; got {per_task_prior_scale}")
        self.noise_scale = float(noise_scale)
        self.per_task = per_task
        self.learned = learned and not per_task
        self.num_task_params = 1 if per_task else 0
        self.task_param_prior_scale = float(per_task_prior_scale)

    def __repr__(self) -> str:
        mode = "per_task" if self.per_task else ("learned" if self.learned else "fixed")
        return f"GaussianLikelihood(noise_scale={self.noise_scale}, {mode})"

    @property
    def spec(self) -> LikelihoodSpec:
        if self.per_task:
            return LikelihoodSpec("gaussian", "per_task", self.noise_scale)
        return LikelihoodSpec("gaussian", "learned" if self.learned else "fixed", self.noise_scale)

    def global_priors(self) -> dict[str, dist.Distribution]:
        if not self.learned:
            return {}
        return {"noise_scale": dist.LogNormal(math.log(self.noise_scale), 1.0)}

    def initial_values(self) -> dict[str, Tensor]:
        return {"noise_scale": torch.tensor(self.noise_scale)} if self.learned else {}

    def task_param_init(self) -> Tensor:
        return torch.full((self.num_task_params,), math.log(self.noise_scale))

    def with_task_params(
        self, params: Mapping[str, Tensor], task_params: Tensor
    ) -> Mapping[str, Tensor]:
        if not self.per_task:
            return params
        return {**params, "noise_scale": task_params[:, 0].exp().reshape(-1, 1, 1)}

    def scale(self, params: Mapping[str, Tensor]) -> Tensor | float:
        r""":math:`\sigma`: a scalar, or ``(T, 1, 1)`` per task."""
        return params["noise_scale"] if (self.learned or self.per_task) else self.noise_scale

    def _log_scale_per_task(self, sigma: Tensor | float) -> Tensor | float:
        if isinstance(sigma, Tensor):
            return torch.log(sigma).reshape(-1) if sigma.dim() > 0 else torch.log(sigma)
        return math.log(sigma)

    def task_param_curvature(
        self, f: Tensor, params: Mapping[str, Tensor], mask: Tensor | None
    ) -> Tensor:
        r"""Fisher information of :math:`\log\sigma_j`: 2 per observed value."""
        if not self.per_task:
            return f.new_zeros(f.shape[0], 0)
        values = math.prod(f.shape[2:])
        count = (
            f.new_full((f.shape[0],), float(f.shape[1]))
            if mask is None
            else mask.sum(-1).to(f.dtype)
        ) * values
        return (2.0 * count).unsqueeze(-1)

    def distribution(self, f: Tensor, params: Mapping[str, Tensor]) -> dist.Distribution:
        return dist.Normal(f, self.scale(params)).to_event(f.dim() - 2)

    def log_prob(self, f: Tensor, y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        self.check_targets(f, y)
        sigma = self.scale(params)
        log_sigma = torch.log(sigma) if isinstance(sigma, Tensor) else math.log(sigma)
        z = (y - f) / sigma
        per_value = -0.5 * z.square() - log_sigma - _HALF_LOG_2PI
        return per_value.reshape(*f.shape[:2], -1).sum(-1)

    def check_targets(self, f: Tensor, y: Tensor) -> None:
        """Raise :class:`TaskDataError` unless ``y`` has the outputs' shape ``(T, N, C)``."""
        if y.shape != f.shape:
            hint = " (add the output dimension: y.unsqueeze(-1))" if y.shape == f.shape[:-1] else ""
            raise TaskDataError(
                f"targets have shape {tuple(y.shape)} but the model's outputs have "
                f"{tuple(f.shape)}: give y as (tasks, points, outputs){hint}"
            )

    def log_prob_sum(
        self, f: Tensor, y: Tensor, params: Mapping[str, Tensor], mask: Tensor | None = None
    ) -> Tensor:
        # The normalising constant is added once per task rather than once per value.
        self.check_targets(f, y)
        sigma = self.scale(params)
        sq = ((y - f) / sigma).square()
        if sq.dim() > 2:
            sq = sq.reshape(*sq.shape[:2], -1).sum(-1)
        values_per_point = math.prod(f.shape[2:])
        if mask is None:
            count: Tensor | int = f.shape[1] * values_per_point
        else:
            sq = torch.where(mask, sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
            count = mask.sum(-1) * values_per_point
        return -0.5 * sq.sum(-1) - count * (self._log_scale_per_task(sigma) + _HALF_LOG_2PI)

    def _eye_over(self, f: Tensor, params: Mapping[str, Tensor], power: int) -> Tensor:
        sigma = self.scale(params)
        C = math.prod(f.shape[2:])
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        if isinstance(sigma, Tensor) and sigma.dim() > 0:
            return (eye / sigma.reshape(-1, 1, 1, 1) ** power).expand(*f.shape[:2], C, C)
        return (eye / sigma**power).expand(*f.shape[:2], C, C)

    def output_precision(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return self._eye_over(f, params, 2)

    def output_factor(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return self._eye_over(f, params, 1)

    def noise_variance(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r""":math:`\sigma^2` broadcast to ``f``'s shape ``(T, N, C)``."""
        sigma = self.scale(params)
        if isinstance(sigma, Tensor) and sigma.dim() > 0:
            return (sigma.reshape(-1, 1, 1) ** 2).expand(f.shape[0], f.shape[1], -1).expand_as(f)
        return torch.as_tensor(sigma, dtype=f.dtype, device=f.device).square().expand_as(f)


class CategoricalLikelihood(Likelihood):
    r""":math:`y_n \sim \mathrm{Categorical}(\mathrm{softmax}(f_n))` with logits ``f`` ``(T, N, C)``."""

    is_classification = True

    def __repr__(self) -> str:
        return "CategoricalLikelihood()"

    @property
    def spec(self) -> LikelihoodSpec:
        return LikelihoodSpec("categorical")

    def distribution(self, f: Tensor, params: Mapping[str, Tensor]) -> dist.Distribution:
        return dist.Categorical(logits=f)

    def check_targets(self, f: Tensor, y: Tensor) -> None:
        """Raise :class:`TaskDataError` unless ``y`` holds integer labels ``(T, N)`` in range."""
        if y.shape != f.shape[:2] or y.is_floating_point():
            raise TaskDataError(
                f"labels must be integers of shape {tuple(f.shape[:2])} (tasks, points); got "
                f"{y.dtype} {tuple(y.shape)}"
            )
        C = f.shape[-1]
        outside = (y < 0) | (y >= C)
        if bool(outside.any()):
            task, point = (int(i) for i in outside.nonzero()[0])
            where = f"task {task}, point {point}" if y.shape[0] > 1 else f"point {point}"
            raise TaskDataError(
                f"labels must lie in 0..{C - 1} for the model's {C} classes; {where} has label "
                f"{int(y[task, point])} ({int(outside.sum())} of {y.numel()} labels out of "
                "range). Relabel the classes of each task 0..C-1, or give the network C outputs."
            )

    def log_prob(self, f: Tensor, y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        self.check_targets(f, y)
        return torch.log_softmax(f, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def output_precision(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def output_factor(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r""":math:`L = (I - p\mathbf 1^\top)\operatorname{diag}(\sqrt p)`: then
        :math:`LL^\top = \operatorname{diag}(p) - pp^\top` because :math:`\mathbf 1^\top p = 1`."""
        log_p = torch.log_softmax(f, dim=-1)
        # sqrt(p) as exp(log p / 2): its gradient stays finite where p underflows to 0, which
        # p.sqrt()'s does not (inf * 0 = NaN in the meta-gradient; repro_12)
        p, root = log_p.exp(), (0.5 * log_p).exp()
        return torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)
