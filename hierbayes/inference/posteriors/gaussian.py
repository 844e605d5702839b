r"""Gaussian task posteriors :math:`\mathcal N(\mu_j, \Sigma_j)`, sampled or linearised.

* :class:`CovariancePosterior`: the protocol of any task posterior that states its covariance
  (this module's posteriors, the Laplace posterior, a user's own).
* :class:`GaussianTaskPosterior`: what the Gaussian posteriors held through a square root share:
  draws :math:`\mu_j + L_j z` from standard-normal noise :math:`z` (on the posterior's device,
  from the generator given), the sampled predictive (a mixture over draws) and the linearised
  one (:func:`~hierbayes.inference.posteriors.linearized.linearized_gaussian`).
* :class:`GaussianPosterior`: a dense :math:`\Sigma_j` per task, e.g. the closed-form posterior
  of the linear-Gaussian model. The mean-field posterior of
  :func:`~hierbayes.inference.references.meanfield.meanfield_vi` is another.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from hierbayes.inference.core.numerics import nonnegative_eigenvalues
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.posteriors.linearized import linearized_gaussian
from hierbayes.inference.posteriors.mixture import predict_from_draws
from hierbayes.inference.predictions import Prediction
from hierbayes.models.density import TaskDensity

__all__ = [
    "PREDICT_METHODS",
    "CovariancePosterior",
    "GaussianPosterior",
    "GaussianTaskPosterior",
    "covariance_factor",
    "standard_normal",
]

#: What ``predict(x, method=...)`` of a Gaussian posterior accepts.
PREDICT_METHODS = ("sampled", "linearized")


@runtime_checkable
class CovariancePosterior(Protocol):
    r"""A task posterior that states its covariance :math:`\Sigma_j`, dense ``(T, D, D)``."""

    mean: Tensor

    def covariance(self) -> Tensor: ...


def standard_normal(
    shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Standard-normal noise of ``shape`` with ``like``'s dtype, made on ``like``'s device from
    ``generator`` (which must live on that device), or from the device's global generator."""
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


def covariance_factor(covariance: Tensor) -> Tensor:
    r"""``L`` with :math:`LL^\top = \Sigma`, batched ``(..., D, D)``: Cholesky where it succeeds,
    else the symmetric square root :math:`V\sqrt{\max(\Lambda, 0)}V^\top` (semi-definite input)."""
    tril, info = torch.linalg.cholesky_ex(covariance)
    if bool((info == 0).all()):
        return tril
    evals, evecs = torch.linalg.eigh(covariance)
    kept = nonnegative_eigenvalues(
        evals, "a posterior covariance whose Cholesky factorisation failed", stacklevel=3
    )
    return evecs * kept.sqrt().unsqueeze(-2) @ evecs.transpose(-1, -2)


def _check_method(method: str) -> None:
    if method not in PREDICT_METHODS:
        raise ValueError(f"predict method must be one of {PREDICT_METHODS}; got {method!r}")


class GaussianTaskPosterior(TaskPosterior, ABC):
    r""":math:`\mathcal N(\mu_j, \Sigma_j)` per task, drawn as :math:`\mu_j + L_j z_j`.

    A subclass states :math:`\Sigma_j` (:meth:`covariance`), how standard-normal noise becomes
    draws (:meth:`transform_noise`) and the quadratic form of the linearised predictive
    (:meth:`covariance_quad`), each in its own structure.

    Attributes
    ----------
    predict_method:
        Default of :meth:`predict`: ``"sampled"`` or ``"linearized"``.
    wall_time:
        Seconds it took to compute (NaN when unknown), reported by the comparison.
    """

    predict_method: str = "sampled"
    wall_time: float = math.nan

    @abstractmethod
    def covariance(self) -> Tensor:
        r""":math:`\Sigma_j`, ``(T, D, D)``."""

    @abstractmethod
    def transform_noise(self, z: Tensor) -> Tensor:
        r""":math:`\mu_j + L_j z_{sj}` for standard-normal ``z`` ``(S, T, D)``, with
        :math:`L_jL_j^\top = \Sigma_j`; ``(S, T, D)``."""

    def marginal_variance(self) -> Tensor:
        with torch.no_grad():
            return self.covariance().diagonal(dim1=-2, dim2=-1)

    @abstractmethod
    def covariance_quad(self, J: Tensor) -> Tensor:
        r"""The diagonal of :math:`J_j\Sigma_j J_j^\top` for ``J`` ``(T, R, D)``; ``(T, R)``."""

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws ``(num_samples, T, D)``: :meth:`transform_noise` of standard-normal noise made
        on the posterior's device from ``generator`` (the device's global generator if ``None``)."""
        return self.transform_noise(
            standard_normal((num_samples, *self.mean.shape), self.mean, generator)
        )

    def predict(
        self,
        x: Tensor,
        *,
        method: str | None = None,
        num_samples: int = 400,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> Prediction:
        r"""Predictive distribution at ``x`` ``(T, M, ...)``.

        ``method`` (default :attr:`predict_method`): ``"sampled"``, the mixture over
        ``num_samples`` draws (from ``generator``, else from one seeded with 0, so repeated
        calls agree); or ``"linearized"``, :math:`\mathcal N(f(x;\mu_j),
        \operatorname{diag}(J_j\Sigma_jJ_j^\top)+\sigma^2)`
        (:func:`~hierbayes.inference.posteriors.linearized.linearized_gaussian`; networks with a
        Gaussian likelihood only).
        """
        method = self.predict_method if method is None else method
        _check_method(method)
        if method == "linearized":
            return linearized_gaussian(
                self.density, self.params, self.mean, x, self.covariance_quad
            )
        if generator is None:
            generator = torch.Generator(device=self.mean.device).manual_seed(0)
        draws = self.sample(num_samples, generator=generator)
        return predict_from_draws(self.density, self.params, draws, x)


class GaussianPosterior(GaussianTaskPosterior):
    r""":math:`\mathcal N(\mu_j, \Sigma_j)` for each task, with a dense covariance.

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
        (exact when the model is linear in :math:`\phi`).
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
        return self._covariance

    @property
    def scale_tril(self) -> Tensor:
        r"""A square root :math:`L_j L_j^\top = \Sigma_j`, ``(T, D, D)`` (Cholesky, or a
        symmetric eigen-square-root when :math:`\Sigma_j` is only semi-definite)."""
        if self._tril is None:
            self._tril = covariance_factor(self._covariance)
        return self._tril

    def transform_noise(self, z: Tensor) -> Tensor:
        return self.mean + torch.einsum("tij,stj->sti", self.scale_tril, z)

    def covariance_quad(self, J: Tensor) -> Tensor:
        return torch.einsum("trd,tde,tre->tr", J, self._covariance.to(J), J)
