r"""The curvature protocol and the inputs every backend receives.

A curvature estimate is a batch of ``T`` symmetric positive-definite ``D x D`` matrices

.. math::

    \hat H_j \approx -\nabla^2_\phi \big[\log p(\mathcal D_j \mid \phi) + \log p(\phi \mid \theta)\big]
    \Big|_{\phi = \hat\phi_j} = C_j + P_j,

the curvature :math:`C_j` of the negative log likelihood of a task's data plus the prior
precision :math:`P_j` (diagonal). Each backend stores :math:`\hat H` in its own structure and
knows its log determinant, how to solve with it, how to draw from
:math:`\mathcal N(0, \hat H^{-1})`, and its dense form (for tests). Every quantity stays a
differentiable function of :math:`\hat\phi` and of the prior precision, so log determinants and
solves can be back-propagated into :math:`\theta` through the inner loop (the point of LLAMA,
Grant et al. 2018, §4), unlike libraries that build curvature under ``no_grad``.

All dense factorisations use Cholesky: torch 2.13's CPU build returns wrong batched
``slogdet``/``lu_factor``/``solve`` for batches of matrices of size 256 or more when more than
one thread runs; Cholesky is unaffected.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hierbayes.errors import NumericalError
from hierbayes.models.density import NetworkDensity, TaskDensity

__all__ = [
    "CurvatureEstimate",
    "CurvatureInputs",
    "cholesky_logdet",
    "row_constant",
    "safe_cholesky",
]


@dataclass
class CurvatureInputs:
    r"""What a backend needs to build :math:`\hat H` for ``T`` tasks.

    Attributes
    ----------
    density:
        The model's per-task densities (a :class:`~hierbayes.models.TaskDensity`).
    params:
        Global values (:math:`\theta`, noise scale, ...).
    phi:
        :math:`\hat\phi`, ``(T, D)``, part of the autograd graph when meta-training.
    x, y, mask:
        The data the curvature is of: ``(T, N, ...)``, ``(T, N, ...)``, optional ``(T, N)``.
    prior_precision:
        Diagonal of :math:`P`, ``(D,)`` or ``(T, D)``, positive.
    create_graph:
        Keep every step differentiable (meta-training); ``False`` for evaluation.
    """

    density: TaskDensity
    params: Mapping[str, Tensor]
    phi: Tensor
    x: Tensor
    y: Tensor
    mask: Tensor | None
    prior_precision: Tensor
    create_graph: bool = True
    #: The whitened output Jacobian of ``x`` at ``phi`` and the outputs ``(T, N, C)``, when the
    #: caller has computed them already (the paper loss's query forward pass serves its
    #: likelihood and its curvature); ``output_jacobian`` returns them instead of recomputing.
    precomputed: tuple[Any, Tensor] | None = field(default=None, repr=False)

    @property
    def num_tasks(self) -> int:
        return int(self.phi.shape[0])

    @property
    def num_params(self) -> int:
        return int(self.phi.shape[1])

    def prior_precision_matrix(self) -> Tensor:
        """:math:`P` broadcast to ``(T, D)``."""
        return self.prior_precision.expand(self.num_tasks, self.num_params)

    def base_precision(self) -> Tensor:
        r""":math:`P` plus the diagonal curvature of parameters outside the network (a
        likelihood's per-task parameters: their Fisher information), ``(T, D)``. The
        Jacobian-based backends add their network curvature to this."""
        P = self.prior_precision_matrix()
        if not isinstance(self.density, NetworkDensity):
            return P
        diagonal = self.density.diagonal_curvature(self.params, self.phi, self.x, self.y, self.mask)
        return P if diagonal is None else P + diagonal


class CurvatureEstimate(ABC):
    r"""A batch of ``T`` positive-definite curvature matrices :math:`\hat H_j` (``D x D``)."""

    #: The registered name of the backend.
    name: str = ""

    @abstractmethod
    def logdet(self) -> Tensor:
        r""":math:`\log\det \hat H_j`, shape ``(T,)``."""

    @abstractmethod
    def solve(self, rhs: Tensor) -> Tensor:
        r""":math:`\hat H_j^{-1} b_j` for ``rhs`` ``(T, D)`` or ``(T, D, K)``."""

    @abstractmethod
    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws from :math:`\mathcal N(0, \hat H_j^{-1})`, shape ``(num_samples, T, D)``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        r""":math:`\hat H_j` as dense ``(T, D, D)`` matrices (for tests and small ``D``)."""

    def inv_quad(self, rhs: Tensor) -> Tensor:
        r""":math:`b_j^\top \hat H_j^{-1} b_j` for ``rhs`` ``(T, D)``, shape ``(T,)``."""
        return (rhs * self.solve(rhs)).sum(-1)

    def covariance(self) -> Tensor:
        r""":math:`\hat H_j^{-1}` as dense ``(T, D, D)`` matrices."""
        dense = self.to_dense()
        eye = torch.eye(dense.shape[-1], dtype=dense.dtype, device=dense.device)
        return torch.cholesky_solve(eye.expand_as(dense), torch.linalg.cholesky(dense))

    def marginal_variance(self) -> Tensor:
        r""":math:`\operatorname{diag}\hat H_j^{-1}`, ``(T, D)``."""
        return self.covariance().diagonal(dim1=-2, dim2=-1)


def row_constant(matrix: Tensor) -> Tensor | None:
    """``(T, 1)`` if every row of ``matrix`` ``(T, D)`` is one repeated value (an expanded
    scalar, as an isotropic prior precision is), else ``None``. Lets structured code skip
    element-wise work on ``(T, D)`` tensors."""
    if matrix.dim() == 2 and matrix.stride(-1) == 0:
        return matrix[:, :1]
    return None


def cholesky_logdet(chol: Tensor) -> Tensor:
    """``log det`` of ``L Lᵀ`` from its Cholesky factor ``L`` ``(..., n, n)``."""
    return 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def safe_cholesky(matrix: Tensor, what: str) -> Tensor:
    """Cholesky factor, or a :class:`~hierbayes.errors.NumericalError` naming ``what`` and the
    first failing task."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        task = int((info > 0).nonzero()[0, 0]) if info.dim() > 0 else 0
        raise NumericalError(
            f"{what} is not positive definite for task {task} (Cholesky failed at column "
            f"{int(info.flatten()[task])}); the curvature contains NaN or infinite values or "
            "the prior precision is not positive"
        )
    return chol
