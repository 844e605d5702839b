r"""The diagonal of the generalised Gauss--Newton matrix plus the prior precision.

.. math::

    \hat H_j = \operatorname{diag}\big(\tilde J_j^\top \tilde J_j\big) + P_j

(:mod:`~hierbayes.inference.curvature.jacobian` for :math:`\tilde J`). Cheapest and crudest:
correlations between parameters are dropped, so log determinants are over-estimated
(Hadamard's inequality) and posteriors are axis-aligned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierbayes.inference.curvature.base import CurvatureEstimate, CurvatureInputs
from hierbayes.inference.curvature.jacobian import output_jacobian
from hierbayes.inference.curvature.observation import observation_jacobian
from hierbayes.models.density import capabilities

__all__ = ["DiagonalCurvature", "diagonal_ggn"]


class DiagonalCurvature(CurvatureEstimate):
    r""":math:`\hat H_j = \operatorname{diag}(d_j)` with ``d`` ``(T, D)`` positive."""

    name = "diag"

    def __init__(self, diagonal: Tensor) -> None:
        self.diagonal = diagonal

    def logdet(self) -> Tensor:
        return self.diagonal.log().sum(-1)

    def solve(self, rhs: Tensor) -> Tensor:
        return rhs / (self.diagonal if rhs.dim() == 2 else self.diagonal.unsqueeze(-1))

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(
            num_samples, *self.diagonal.shape, generator=generator, dtype=self.diagonal.dtype
        )
        return z.to(self.diagonal.device) / self.diagonal.sqrt()

    def to_dense(self) -> Tensor:
        return torch.diag_embed(self.diagonal)

    def covariance(self) -> Tensor:
        return torch.diag_embed(1.0 / self.diagonal)

    def marginal_variance(self) -> Tensor:
        return 1.0 / self.diagonal


def diagonal_ggn(inputs: CurvatureInputs, *, jacobian: str = "auto") -> DiagonalCurvature:
    """Build :class:`DiagonalCurvature` (registered as ``"diag"``): from the network's output
    Jacobian for a network model, else from any Pyro program's observation sites
    (:mod:`~hierbayes.inference.curvature.observation`)."""
    if not capabilities(inputs.density).network:
        J = observation_jacobian(inputs)
        return DiagonalCurvature(J.square().sum(1) + inputs.base_precision())
    jac, _ = output_jacobian(inputs, method=jacobian)
    return DiagonalCurvature(jac.column_square_sums() + inputs.base_precision())
