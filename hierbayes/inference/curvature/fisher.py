r"""A sampled diagonal Fisher: cheap curvature for networks without layer-wise Jacobians.

Registered as ``"fisher_diag"``. For a classifier network whose layers the fast path cannot
record (batch norm), ``"diag"`` and ``"ggn"`` take dense ``(N·C) x D`` Jacobians by autograd;
this backend needs ``N`` gradient rows per task instead.
"""

from __future__ import annotations

import torch

from hierbayes.inference.curvature.base import CurvatureInputs
from hierbayes.inference.curvature.diag import DiagonalCurvature
from hierbayes.models.density import NetworkDensity

__all__ = ["sampled_fisher_diagonal"]


def sampled_fisher_diagonal(inputs: CurvatureInputs, *, seed: int = 0) -> DiagonalCurvature:
    r"""The diagonal of the Fisher information (= the GGN of a softmax likelihood) estimated
    with one sampled label per point, plus the prior precision (registered as
    ``"fisher_diag"``):

    .. math::

        \hat H_j = \sum_n \big(\nabla_\phi \log p(\hat y_{jn}\mid f(x_{jn};\phi))\big)^{\odot 2}
        + P_j, \qquad \hat y_{jn}\sim p(\cdot\mid f(x_{jn};\phi)),

    an unbiased estimate of ``"diag"``'s :math:`\operatorname{diag}(\tilde J^\top\tilde J)`
    from ``N`` gradient rows per task instead of ``N x C`` (Martens 2014, §9; Kunstner et al.
    2019). With batch norm a network has no layer-wise Jacobians, so ``"diag"`` and ``"ggn"``
    take dense ``(N·C) x D`` Jacobians by autograd, which at :math:`D\approx 10^5` costs 5-20 x
    more; ``"kfac"`` needs layer records. Labels are drawn from a generator seeded with
    ``seed``, so the estimate is a deterministic function of :math:`\phi` (differentiable into
    it when ``inputs.create_graph``).
    """
    density = inputs.density
    if not isinstance(density, NetworkDensity) or not density.likelihood.is_classification:
        raise ValueError("curvature 'fisher_diag' needs a classifier network (a TaskModel)")
    phi = inputs.phi
    cg = inputs.create_graph
    with torch.enable_grad():
        if not phi.requires_grad:
            phi = phi.detach().requires_grad_(True)
        f = density.outputs(inputs.params, phi, inputs.x)  # (T, N, C)
        T, N = f.shape[:2]
        logp = torch.log_softmax(f, dim=-1)
        g = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.rand(T, N, 1, generator=g, dtype=f.dtype).to(f.device)
        drawn = (logp.detach().exp().cumsum(-1) < u).sum(-1).clamp_max(f.shape[-1] - 1)
        picked = logp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)  # (T, N)
        if inputs.mask is not None:
            picked = picked * inputs.mask.to(picked.dtype)
        eye = torch.eye(N, dtype=f.dtype, device=f.device).reshape(N, 1, N).expand(N, T, N)
        (rows,) = torch.autograd.grad(
            picked, phi, grad_outputs=eye, is_grads_batched=True, create_graph=cg
        )  # (N, T, D)
    diagonal = rows.square().sum(0)
    if not cg:
        diagonal = diagonal.detach()
    return DiagonalCurvature(diagonal + inputs.base_precision())
