r"""Curvature held as dense ``D x D`` matrices, factorised by Cholesky."""

from __future__ import annotations

import torch
from torch import Tensor

from hierbayes.inference.curvature.base import CurvatureEstimate, cholesky_logdet, safe_cholesky

__all__ = ["DenseCurvature"]


class DenseCurvature(CurvatureEstimate):
    r""":math:`\hat H_j` as dense matrices ``(T, D, D)`` with their Cholesky factors."""

    name = "dense"

    def __init__(self, matrix: Tensor, chol: Tensor | None = None) -> None:
        self.matrix = matrix
        self.chol = safe_cholesky(matrix, "the curvature") if chol is None else chol

    def logdet(self) -> Tensor:
        return cholesky_logdet(self.chol)

    def solve(self, rhs: Tensor) -> Tensor:
        if rhs.dim() == 2:
            return torch.cholesky_solve(rhs.unsqueeze(-1), self.chol).squeeze(-1)
        return torch.cholesky_solve(rhs, self.chol)

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        T, D = self.matrix.shape[:2]
        z = torch.randn(T, D, num_samples, generator=generator, dtype=self.matrix.dtype).to(
            self.matrix.device
        )
        # x = L^{-T} z has covariance (L L^T)^{-1}
        x = torch.linalg.solve_triangular(self.chol.transpose(-1, -2), z, upper=True)
        return x.permute(2, 0, 1)

    def to_dense(self) -> Tensor:
        return self.matrix

    def covariance(self) -> Tensor:
        eye = torch.eye(self.matrix.shape[-1], dtype=self.matrix.dtype, device=self.matrix.device)
        return torch.cholesky_solve(eye.expand_as(self.matrix), self.chol)
