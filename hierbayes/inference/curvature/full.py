r"""The exact Hessian of the negative log posterior (small ``D`` only).

.. math::

    \hat H_j = -\nabla^2_\phi \log p(\mathcal D_j \mid \phi)\big|_{\hat\phi_j} + P_j

built with ``D`` batched reverse-mode passes over the gradient, all tasks at once
(:func:`~hierbayes.inference.core.joint.batched_hessian`); memory is ``T·D²``. Away from a
mode, and for non-convex networks, the Hessian can be indefinite: then, with a
:class:`UserWarning`, its eigenvalues below the task's smallest prior precision are raised to
that value (the prior's curvature is the floor), which keeps :math:`\hat H` positive definite
and its log determinant finite.

That repair :math:`V\max(\Lambda, \tau)V^\top` is a spectral function, differentiated by the
Daleckii--Krein formula :math:`d\hat H = V(\Gamma\circ V^\top dH\,V)V^\top` with divided
differences :math:`\Gamma_{ij} = (h(\lambda_i)-h(\lambda_j))/(\lambda_i-\lambda_j)` (and
:math:`h'` for equal eigenvalues), so the many eigenvalues raised to the same floor do not
make the gradient NaN, as ``eigh``'s own backward would.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from hierbayes.inference.core.joint import batched_hessian
from hierbayes.inference.curvature.base import CurvatureInputs
from hierbayes.inference.curvature.dense import DenseCurvature

__all__ = ["FullHessianCurvature", "clamp_eigenvalues", "full_hessian"]


class _ClampEigenvalues(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, matrix: Tensor, floor: Tensor) -> Tensor:
        evals, evecs = torch.linalg.eigh(matrix)
        clamped = torch.maximum(evals, floor.unsqueeze(-1))
        ctx.save_for_backward(evals, evecs, clamped, floor)
        return (evecs * clamped.unsqueeze(-2)) @ evecs.transpose(-1, -2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        evals, evecs, clamped, floor = ctx.saved_tensors
        below = evals < floor.unsqueeze(-1)
        slope = (~below).to(evals.dtype)  # h'(lambda)
        gap = evals.unsqueeze(-1) - evals.unsqueeze(-2)
        diff = clamped.unsqueeze(-1) - clamped.unsqueeze(-2)
        scale = evals.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
        close = gap.abs() <= 1e-10 * scale
        mean_slope = 0.5 * (slope.unsqueeze(-1) + slope.unsqueeze(-2))
        divided = torch.where(
            close, mean_slope, diff / torch.where(close, torch.ones_like(gap), gap)
        )
        inner = evecs.transpose(-1, -2) @ (0.5 * (grad + grad.transpose(-1, -2))) @ evecs
        grad_matrix = evecs @ (divided * inner) @ evecs.transpose(-1, -2)
        grad_floor = (inner.diagonal(dim1=-2, dim2=-1) * below.to(inner.dtype)).sum(-1)
        return grad_matrix, grad_floor


def clamp_eigenvalues(matrix: Tensor, floor: Tensor) -> Tensor:
    r""":math:`V\max(\Lambda, \tau)V^\top` for symmetric ``matrix`` ``(..., D, D)`` and ``floor``
    ``(...)``, differentiable by divided differences (no NaN at repeated eigenvalues)."""
    result: Tensor = _ClampEigenvalues.apply(matrix, floor)
    return result


class FullHessianCurvature(DenseCurvature):
    name = "full"

    def __init__(self, matrix: Tensor, chol: Tensor, repaired_tasks: list[int]) -> None:
        super().__init__(matrix, chol)
        #: Tasks whose Hessian was indefinite and had its eigenvalues raised to the floor.
        self.repaired_tasks = repaired_tasks


def full_hessian(inputs: CurvatureInputs) -> FullHessianCurvature:
    r"""Build :class:`FullHessianCurvature` (registered as ``"full"``): the exact Hessian of
    :math:`-\log p(\mathcal D_j\mid\phi)` (:func:`~hierbayes.inference.core.joint.batched_hessian`)
    plus the diagonal prior precision."""

    def log_likelihood(phi: Tensor) -> Tensor:
        return inputs.density.log_likelihood(inputs.params, phi, inputs.x, inputs.y, inputs.mask)

    _, _, hessian = batched_hessian(log_likelihood, inputs.phi, create_graph=inputs.create_graph)
    prior = inputs.prior_precision_matrix()
    hessian = -hessian + torch.diag_embed(prior)
    chol, info = torch.linalg.cholesky_ex(hessian)
    bad = (info > 0).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            "the Hessian of the negative log posterior is not positive definite for some "
            "tasks; their eigenvalues below the task's smallest prior precision were raised to "
            "it. The Laplace approximation is then only as good as that floor: prefer "
            "curvature='ggn', which is positive definite by construction (for any Pyro "
            "program).",
            UserWarning,
            stacklevel=3,
        )
        index = torch.tensor(bad, device=hessian.device)
        repaired = clamp_eigenvalues(hessian[index], prior[index].min(-1).values)
        repaired = 0.5 * (repaired + repaired.transpose(1, 2))
        hessian = hessian.index_put((index,), repaired)
        chol = torch.linalg.cholesky(hessian)
    return FullHessianCurvature(hessian, chol, bad)
