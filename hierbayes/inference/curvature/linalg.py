r"""A symmetric eigendecomposition whose gradient survives repeated eigenvalues.

``torch.linalg.eigh``'s backward divides by eigenvalue gaps :math:`\lambda_j - \lambda_i`; K-FAC
factors of few-shot tasks are rank-deficient (``N`` points, many more inputs), so their null
spaces hold many equal eigenvalues and the gradient becomes NaN. Here the gap factor is
broadened,

.. math::

    F_{ij} = \frac{\lambda_j - \lambda_i}{(\lambda_j - \lambda_i)^2 + \epsilon^2},

which is the exact :math:`1/(\lambda_j-\lambda_i)` for separated eigenvalues and 0 inside a
degenerate block, where every function of the matrix used here (spectral functions and
Kronecker products of them) has a zero rotational derivative anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["symmetric_eigh"]


class _SymmetricEigh(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, matrix: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        evals, evecs = torch.linalg.eigh(matrix)
        ctx.save_for_backward(evals, evecs)
        ctx.eps = eps
        return evals, evecs

    @staticmethod
    def backward(
        ctx: Any, grad_evals: Tensor | None, grad_evecs: Tensor | None
    ) -> tuple[Tensor, None]:  # type: ignore[override]
        evals, evecs = ctx.saved_tensors
        inner = torch.zeros_like(evecs)
        if grad_evecs is not None:
            gap = evals.unsqueeze(-2) - evals.unsqueeze(-1)  # gap[i, j] = lambda_j - lambda_i
            scale = evals.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
            eps = ctx.eps * scale
            factor = gap / (gap.square() + eps.square())
            inner = factor * (evecs.transpose(-1, -2) @ grad_evecs)
        if grad_evals is not None:
            inner = inner + torch.diag_embed(grad_evals)
        grad = evecs @ inner @ evecs.transpose(-1, -2)
        return 0.5 * (grad + grad.transpose(-1, -2)), None


def symmetric_eigh(matrix: Tensor, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """``(eigenvalues, eigenvectors)`` of symmetric ``matrix`` ``(..., n, n)``, ascending, with
    the broadened backward above (``eps`` relative to the largest eigenvalue's magnitude)."""
    evals, evecs = _SymmetricEigh.apply(matrix, eps)
    return evals, evecs
