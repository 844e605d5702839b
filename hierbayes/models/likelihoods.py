r"""Observation models :math:`p(y \mid f)` for network outputs :math:`f = f(x; \phi)`.

Each likelihood gives the Pyro distribution used at the model's observed site and a closed-form
log density used by the fast path; the tests check they agree. For the generalised
Gauss--Newton curvature each also gives :math:`\Lambda`, the Hessian of :math:`-\log p(y\mid f)`
with respect to :math:`f` (Martens 2020; MATH.md §4).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["CategoricalLikelihood", "GaussianLikelihood", "Likelihood"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Likelihood(ABC):
    """Observation model with global latents of its own (e.g. a learned noise scale)."""

    #: Whether targets are class labels (integer, one per point) or real vectors.
    is_classification: bool = False

    def global_priors(self) -> dict[str, dist.Distribution]:
        """Hyperpriors of the likelihood's own global latents, by site name."""
        return {}

    def initial_values(self) -> dict[str, Tensor]:
        """Where the guide starts each of those latents."""
        return {}

    @abstractmethod
    def distribution(self, f: Tensor, params: Mapping[str, Tensor]) -> dist.Distribution:
        """:math:`p(y \\mid f)` with batch shape ``f.shape[:2]`` = ``(T, N)``."""

    @abstractmethod
    def log_prob(self, f: Tensor, y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """Closed-form :math:`\\log p(y_n \\mid f_n)`, shape ``(T, N)``."""

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


class GaussianLikelihood(Likelihood):
    r""":math:`y_n \sim \mathcal N(f_n, \sigma^2 I)`.

    Parameters
    ----------
    noise_scale:
        :math:`\sigma`, or its initial value when ``learned``.
    learned:
        Make :math:`\sigma` a global latent ``noise_scale`` with hyperprior
        :math:`\log\sigma \sim \mathcal N(\log\sigma_0, 1)`, point-estimated with
        :math:`\theta` (type-II MAP), so that predictive intervals are honest.
    """

    def __init__(self, noise_scale: float = 1.0, *, learned: bool = True) -> None:
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be positive; got {noise_scale}")
        self.noise_scale = float(noise_scale)
        self.learned = learned

    def __repr__(self) -> str:
        return f"GaussianLikelihood(noise_scale={self.noise_scale}, learned={self.learned})"

    def global_priors(self) -> dict[str, dist.Distribution]:
        if not self.learned:
            return {}
        return {"noise_scale": dist.LogNormal(math.log(self.noise_scale), 1.0)}

    def initial_values(self) -> dict[str, Tensor]:
        return {"noise_scale": torch.tensor(self.noise_scale)} if self.learned else {}

    def scale(self, params: Mapping[str, Tensor]) -> Tensor | float:
        """:math:`\\sigma`: the learned value, or the fixed one."""
        return params["noise_scale"] if self.learned else self.noise_scale

    def distribution(self, f: Tensor, params: Mapping[str, Tensor]) -> dist.Distribution:
        return dist.Normal(f, self.scale(params)).to_event(f.dim() - 2)

    def log_prob(self, f: Tensor, y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        sigma = self.scale(params)
        log_sigma = torch.log(sigma) if isinstance(sigma, Tensor) else math.log(sigma)
        z = (y - f) / sigma
        per_value = -0.5 * z.square() - log_sigma - _HALF_LOG_2PI
        return per_value.reshape(*f.shape[:2], -1).sum(-1)

    def log_prob_sum(
        self, f: Tensor, y: Tensor, params: Mapping[str, Tensor], mask: Tensor | None = None
    ) -> Tensor:
        # The normalising constant is added once per task rather than once per value.
        sigma = self.scale(params)
        log_sigma = torch.log(sigma) if isinstance(sigma, Tensor) else math.log(sigma)
        sq = ((y - f) / sigma).square()
        if sq.dim() > 2:
            sq = sq.reshape(*sq.shape[:2], -1).sum(-1)
        values_per_point = math.prod(f.shape[2:])
        if mask is None:
            count: Tensor | int = f.shape[1] * values_per_point
        else:
            sq = torch.where(mask, sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
            count = mask.sum(-1) * values_per_point
        return -0.5 * sq.sum(-1) - count * (log_sigma + _HALF_LOG_2PI)

    def output_precision(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        sigma = self.scale(params)
        C = math.prod(f.shape[2:])
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return (eye / sigma**2).expand(*f.shape[:2], C, C)

    def output_factor(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        sigma = self.scale(params)
        C = math.prod(f.shape[2:])
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return (eye / sigma).expand(*f.shape[:2], C, C)


class CategoricalLikelihood(Likelihood):
    r""":math:`y_n \sim \mathrm{Categorical}(\mathrm{softmax}(f_n))` with logits ``f`` ``(T, N, C)``."""

    is_classification = True

    def __repr__(self) -> str:
        return "CategoricalLikelihood()"

    def distribution(self, f: Tensor, params: Mapping[str, Tensor]) -> dist.Distribution:
        return dist.Categorical(logits=f)

    def log_prob(self, f: Tensor, y: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return torch.log_softmax(f, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def output_precision(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def output_factor(self, f: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        r""":math:`L = (I - p\mathbf 1^\top)\operatorname{diag}(\sqrt p)`: then
        :math:`LL^\top = \operatorname{diag}(p) - pp^\top` because :math:`\mathbf 1^\top p = 1`."""
        p = torch.softmax(f, dim=-1)
        root = p.sqrt()
        return torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)
