r"""The exact generalised Gauss--Newton matrix through the matrix determinant lemma.

.. math::

    \hat H_j = \tilde J_j^\top \tilde J_j + P_j, \qquad
    \log\det \hat H_j = \log\det P_j + \log\det\big(I_R + \tilde J_j P_j^{-1} \tilde J_j^\top\big)

(MATH.md §4), with :math:`\tilde J_j` the ``R x D`` whitened output Jacobian (``R = N·C``
rows, :mod:`~hierbayes.inference.curvature.jacobian`) and :math:`P_j` diagonal. Every operation
is on ``R x R`` matrices, ``O(R² D)`` in all, exact, and positive definite by construction:

* solve (Woodbury): :math:`\hat H^{-1} b = P^{-1}b - P^{-1}\tilde J^\top (I + \tilde J P^{-1}\tilde J^\top)^{-1}\tilde J P^{-1} b`;
* sampling: :math:`\hat H^{-1}(P^{1/2} z + \tilde J^\top e)` with :math:`z, e` standard normal
  has covariance :math:`\hat H^{-1}(P + \tilde J^\top\tilde J)\hat H^{-1} = \hat H^{-1}`;
* linearised predictive variance at new inputs with Jacobian :math:`J_*`:
  :math:`\operatorname{diag}(J_* \hat H^{-1} J_*^\top) = \operatorname{diag}(J_*P^{-1}J_*^\top) -
  \lVert L_K^{-1} \tilde J P^{-1} J_*^\top\rVert^2_{\text{col}}` with :math:`L_K L_K^\top = I + \tilde JP^{-1}\tilde J^\top`.

References: Martens (2020), New insights and perspectives on the natural gradient method;
Immer, Korzepa & Bauer (2021), Improving predictions of Bayesian neural nets via local
linearization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierbayes.inference.curvature.base import (
    CurvatureEstimate,
    CurvatureInputs,
    cholesky_logdet,
    row_constant,
    safe_cholesky,
)
from hierbayes.inference.curvature.dense import DenseCurvature
from hierbayes.inference.curvature.jacobian import DenseJacobian, OutputJacobian, output_jacobian
from hierbayes.inference.curvature.observation import FISHER_DRAWS, observation_jacobian
from hierbayes.models.density import capabilities

__all__ = ["GGNCurvature", "ggn", "observation_ggn"]


class GGNCurvature(CurvatureEstimate):
    r""":math:`\tilde J^\top\tilde J + P` kept as :math:`\tilde J` (or its layer pieces) and ``P``."""

    name = "ggn"

    def __init__(self, jacobian: OutputJacobian, prior_precision: Tensor) -> None:
        self.jacobian = jacobian
        self.prior_precision = prior_precision
        constant = row_constant(prior_precision)
        self.inv_precision = (
            1.0 / prior_precision
            if constant is None
            else (1.0 / constant).expand_as(prior_precision)
        )
        self._constant = constant
        # The R x R system is tiny, so it is factorised in float64: with a small noise scale
        # its entries reach 1e8, beyond what a float32 Cholesky resolves.
        gram = jacobian.gram(self.inv_precision).double()
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        self.chol = safe_cholesky(eye + gram, "I + J P^-1 J^T")
        self.dtype = prior_precision.dtype

    def logdet(self) -> Tensor:
        if self._constant is not None:
            prior = self.prior_precision.shape[-1] * self._constant.squeeze(-1).log()
        else:
            prior = self.prior_precision.log().sum(-1)
        return prior + cholesky_logdet(self.chol).to(self.dtype)

    def solve(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 2
        b = rhs.unsqueeze(-1) if vector else rhs
        u = self.inv_precision.unsqueeze(-1) * b
        w = torch.cholesky_solve(self.jacobian.matvec(u).double(), self.chol).to(self.dtype)
        out = u - self.inv_precision.unsqueeze(-1) * self.jacobian.rmatvec(w)
        return out.squeeze(-1) if vector else out

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        P = self.prior_precision
        T, D = P.shape
        R = self.chol.shape[-1]
        z = torch.randn(T, D, num_samples, generator=generator, dtype=P.dtype).to(P.device)
        e = torch.randn(T, R, num_samples, generator=generator, dtype=P.dtype).to(P.device)
        rhs = P.sqrt().unsqueeze(-1) * z + self.jacobian.rmatvec(e)
        return self.solve(rhs).permute(2, 0, 1)

    def to_dense(self) -> Tensor:
        J = self.jacobian.dense()
        return J.transpose(1, 2) @ J + torch.diag_embed(self.prior_precision)

    def predictive_variance(self, query: OutputJacobian) -> Tensor:
        r""":math:`\operatorname{diag}(J_* \hat H^{-1} J_*^\top)`, ``(T, R_*)``, via Gram matrices only."""
        prior_part = query.gram_diag(self.inv_precision)
        cross = self.jacobian.gram(self.inv_precision, query)  # (T, R, R_*)
        half = torch.linalg.solve_triangular(self.chol, cross.double(), upper=False)
        return prior_part - half.square().sum(1).to(self.dtype)


def ggn(inputs: CurvatureInputs, *, jacobian: str = "auto") -> CurvatureEstimate:
    """Build the GGN (registered as ``"ggn"``): :class:`GGNCurvature` of the network's output
    Jacobian for a network model (the ``NetworkDensity`` fast path), else of any Pyro program
    from its observation sites (:mod:`~hierbayes.inference.curvature.observation`)."""
    if not capabilities(inputs.density).network:
        return observation_ggn(inputs)
    jac, _ = output_jacobian(inputs, method=jacobian)
    return GGNCurvature(jac, inputs.base_precision())


def observation_ggn(
    inputs: CurvatureInputs,
    *,
    num_draws: int = FISHER_DRAWS,
    generator: torch.Generator | None = None,
) -> CurvatureEstimate:
    r"""The GGN :math:`\sum_n J_n^\top F_n J_n + P` of any Pyro program from its observation
    sites (:func:`~hierbayes.inference.curvature.observation.observation_jacobian`): kept as
    the whitened rows :math:`\tilde J` (:class:`GGNCurvature`, Woodbury) when there are no
    more rows than parameters, else as a dense ``(T, D, D)`` matrix."""
    J = observation_jacobian(inputs, num_draws=num_draws, generator=generator)
    P = inputs.base_precision()
    if J.shape[1] <= J.shape[2]:
        return GGNCurvature(DenseJacobian(J), P)
    return DenseCurvature(J.transpose(1, 2) @ J + torch.diag_embed(P))
