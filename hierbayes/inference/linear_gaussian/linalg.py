r"""The linear algebra the linear-Gaussian closed forms share.

Only Cholesky factorisations, triangular solves and symmetric eigendecompositions are used
(never ``slogdet``, ``lu`` or ``solve``, whose batched CPU versions in torch 2.13 are wrong for
matrices of size 256 and more when several threads run).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierbayes.inference.linear_gaussian.validation import Scalar

__all__ = [
    "apply_preconditioner",
    "apply_preconditioner_left",
    "cholesky",
    "preconditioner_factor",
    "scaled_gram",
]


def preconditioner_factor(B: Tensor | None) -> Tensor | None:
    r"""A factor :math:`L` with :math:`B = LL^\top`: ``sqrt(B)`` (diagonal) or Cholesky (full)."""
    if B is None:
        return None
    if B.dim() == 1:
        return B.sqrt()
    L, info = torch.linalg.cholesky_ex(0.5 * (B + B.mT))
    if int(info) != 0:
        raise ValueError(
            "the full preconditioner is not positive definite (its Cholesky factorisation "
            f"failed at column {int(info) - 1}); gradient descent with it is not a descent method "
            "and implies no Gaussian prior"
        )
    return L


def apply_preconditioner(B: Tensor | None, v: Tensor) -> Tensor:
    r""":math:`Bv` for ``v`` ``(..., D)``; ``B`` is ``None`` (identity), ``(D,)`` or ``(D, D)``."""
    if B is None:
        return v
    if B.dim() == 1:
        return B * v
    return v @ B  # B is symmetric


def apply_preconditioner_left(B: Tensor | None, M: Tensor) -> Tensor:
    r""":math:`BM` for ``M`` ``(..., D, K)``."""
    if B is None:
        return M
    if B.dim() == 1:
        return B[:, None] * M
    return B @ M


def scaled_gram(X: Tensor, noise_scale: Scalar) -> Tensor:
    r""":math:`X^\top X/\sigma^2`, ``(..., D, D)``, exactly symmetric."""
    G = X.mT @ X
    G = 0.5 * (G + G.mT)
    return G / torch.as_tensor(noise_scale, dtype=X.dtype, device=X.device) ** 2


def cholesky(A: Tensor, what: str) -> Tensor:
    """Cholesky factor of a batch of matrices, with an error that names the first bad task."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        bad = int((info.reshape(-1) != 0).nonzero()[0])
        where = f" (task {bad})" if info.dim() > 0 else ""
        raise ValueError(f"{what} is not positive definite{where}")
    return L
