r"""The exact Hessian of the negative log posterior (small ``D`` only).

.. math::

    \hat H_j = -\nabla^2_\phi \log p(\mathcal D_j \mid \phi)\big|_{\hat\phi_j} + P_j

built with ``D`` batched reverse-mode passes over the gradient (``is_grads_batched``), all tasks
at once; memory is ``T·D²``. Away from a mode, and for non-convex networks, the Hessian can be
indefinite: then, with a :class:`UserWarning`, its eigenvalues below the task's smallest prior
precision are raised to that value (the prior's curvature is the floor), which keeps
:math:`\hat H` positive definite and its log determinant finite.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from hierbayes.inference.curvature.base import CurvatureInputs
from hierbayes.inference.curvature.dense import DenseCurvature

__all__ = ["FullHessianCurvature", "full_hessian"]


class FullHessianCurvature(DenseCurvature):
    name = "full"

    def __init__(self, matrix: Tensor, chol: Tensor, repaired_tasks: list[int]) -> None:
        super().__init__(matrix, chol)
        #: Tasks whose Hessian was indefinite and had its eigenvalues raised to the floor.
        self.repaired_tasks = repaired_tasks


def full_hessian(inputs: CurvatureInputs) -> FullHessianCurvature:
    """Build :class:`FullHessianCurvature` (registered as ``"full"``)."""
    phi = inputs.phi
    T, D = phi.shape
    with torch.enable_grad():
        if not phi.requires_grad or not inputs.create_graph:
            phi = phi.detach().requires_grad_(True)
        nll = -inputs.density.log_likelihood(
            inputs.params, phi, inputs.x, inputs.y, inputs.mask
        ).sum()
        (grad,) = torch.autograd.grad(nll, phi, create_graph=True)
        eye = torch.eye(D, dtype=phi.dtype, device=phi.device).reshape(D, 1, D).expand(D, T, D)
        (rows,) = torch.autograd.grad(
            grad, phi, grad_outputs=eye, is_grads_batched=True, create_graph=inputs.create_graph
        )
    hessian = rows.permute(1, 0, 2)
    if not inputs.create_graph:
        hessian = hessian.detach()
    prior = inputs.prior_precision_matrix()
    hessian = 0.5 * (hessian + hessian.transpose(1, 2)) + torch.diag_embed(prior)
    chol, info = torch.linalg.cholesky_ex(hessian)
    bad = (info > 0).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            f"the Hessian of the negative log posterior is not positive definite for "
            f"{len(bad)} of {T} tasks (first: task {bad[0]}); their eigenvalues below the "
            "task's smallest prior precision were raised to it. The Laplace approximation is "
            "then only as good as that floor: prefer curvature='ggn', which is positive "
            "definite by construction.",
            UserWarning,
            stacklevel=3,
        )
        evals, evecs = torch.linalg.eigh(hessian)
        floor = prior.min(-1).values.unsqueeze(-1)
        repaired = (evecs * torch.maximum(evals, floor).unsqueeze(-2)) @ evecs.transpose(1, 2)
        repaired = 0.5 * (repaired + repaired.transpose(1, 2))
        is_bad = (info > 0).reshape(T, 1, 1)
        hessian = torch.where(is_bad, repaired, hessian)
        chol = torch.linalg.cholesky(hessian)
    return FullHessianCurvature(hessian, chol, bad)
