r"""Kronecker-factored curvature (K-FAC) with damping added exactly (the paper's choice).

Per ``Linear`` layer (Martens & Grosse 2015), with :math:`\tilde a_n = (a_n, 1)` the layer's
input with a 1 for the bias and :math:`\tilde g_{n,k}` the whitened gradients of the outputs
with respect to its pre-activation, over the task's ``N`` points:

.. math::

    C_l \approx c\, \bar G_l \otimes \bar A_l,\quad
    \bar A_l = \tfrac1N\sum_n \tilde a_n\tilde a_n^\top,\quad
    \bar G_l = \tfrac1N\sum_n\sum_k \tilde g_{n,k}\tilde g_{n,k}^\top,\quad c = N,

exact for one data point. ``Conv2d`` layers use the patch formulation of Grosse & Martens
(2016): the sums run over points and spatial positions and :math:`c = N\cdot|P|`. The prior
precision :math:`\tau_l` (constant within a layer) is added exactly through the factors'
eigendecompositions :math:`\bar A = U_A\operatorname{diag}(\alpha)U_A^\top`,
:math:`\bar G = U_G\operatorname{diag}(\gamma)U_G^\top`:

.. math::

    \log\det(c\,\bar G\otimes\bar A + \tau I) = \sum_k\sum_i \log(c\,\gamma_k\alpha_i + \tau)

(MATH.md §4), and solves act on the ``out x in'`` weight matrix ``[W | b]`` as
:math:`Y = U_G[(U_G^\top V U_A) \oslash (c\gamma\alpha^\top + \tau)]U_A^\top`.

**Gradients.** Few-shot factors are singular (rank at most ``N`` and ``N·K``), so their null
spaces hold many equal eigenvalues and ``eigh``'s eigenvector gradient (which divides by
eigenvalue gaps) is NaN. Nothing here differentiates eigenvectors: the log determinant
uses eigenvalues only (whose gradient is exact), and a solve :math:`Y = H^{-1}V` has the
custom backward :math:`\bar V = W`, :math:`\bar A = -c\,W^\top \bar G Y`,
:math:`\bar G = -c\,W \bar A Y^\top`, :math:`\bar\tau = -\langle W, Y\rangle` with
:math:`W = H^{-1}\bar Y` (from :math:`dY = -H^{-1}\,dH\,Y`), exact whatever the spectrum.

Parameters of no ``Linear``/``Conv2d`` layer (batch norm) keep only the prior precision, as in
the paper.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature.base import CurvatureEstimate, CurvatureInputs, row_constant
from hierbayes.inference.curvature.jacobian import LayerJacobian, output_jacobian
from hierbayes.models.network import unfold_patches

__all__ = ["EigenKroneckerBlock", "KFACCurvature", "KroneckerBlock", "kfac"]


class KroneckerBlock:
    r"""One layer's :math:`c\,\bar G\otimes\bar A + \tau I`, acting on ``[W | b]`` (``out x in'``)."""

    def __init__(
        self, weight: slice, bias: slice | None, out_features: int, damping: Tensor
    ) -> None:
        self.weight, self.bias, self.out_features, self.damping = (
            weight,
            bias,
            out_features,
            damping,
        )

    def to_matrix(self, v: Tensor) -> Tensor:
        """Layer entries of ``v`` ``(T, D, S)`` as ``(T, S, out, in')``."""
        T, _, S = v.shape
        w = v[:, self.weight].permute(0, 2, 1).reshape(T, S, self.out_features, -1)
        if self.bias is None:
            return w
        b = v[:, self.bias].permute(0, 2, 1).reshape(T, S, self.out_features, 1)
        return torch.cat([w, b], dim=-1)

    def from_matrix(self, m: Tensor, D: int) -> Tensor:
        """Inverse of :meth:`to_matrix`, scattered into a zero ``(T, D, S)``."""
        T, S = m.shape[:2]
        parts = [(self.weight, (m[..., :-1] if self.bias is not None else m).reshape(T, S, -1))]
        if self.bias is not None:
            parts.append((self.bias, m[..., -1].reshape(T, S, -1)))
        out = []
        for sl, value in parts:
            out.append(F.pad(value.permute(0, 2, 1), (0, 0, sl.start, D - sl.stop)))
        return torch.stack(out).sum(0)

    def logdet(self) -> Tensor:
        raise NotImplementedError

    def multiply(self, m: Tensor, power: float) -> Tensor:
        """The block to ``power`` (1 or -1) times ``m`` ``(T, S, out, in')``."""
        raise NotImplementedError

    def sample_matrix(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Draws from :math:`\\mathcal N(0, \\text{block}^{-1})` as ``(T, S, out, in')``."""
        raise NotImplementedError


class _KroneckerSolve(torch.autograd.Function):
    """``Y = (c G⊗A + τI)^{-1} V`` on ``(T, S, out, in')`` matrices, with the exact backward."""

    @staticmethod
    def forward(
        ctx: Any,
        V: Tensor,
        A: Tensor,
        G: Tensor,
        c: Tensor,
        tau: Tensor,
        block: EigenKroneckerBlock,
    ) -> Tensor:
        Y = block.solve_detached(V)
        ctx.save_for_backward(A, G, c, tau, Y)
        ctx.block = block
        return Y

    @staticmethod
    def backward(ctx: Any, grad_Y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, None]:
        A, G, c, _tau, Y = ctx.saved_tensors
        W = ctx.block.solve_detached(grad_Y)
        cc = c[:, None, None]
        grad_A = -cc * (W.transpose(-1, -2) @ G.unsqueeze(1) @ Y).sum(1)
        grad_G = -cc * (W @ A.unsqueeze(1) @ Y.transpose(-1, -2)).sum(1)
        inner = (W * Y).sum((1, 2, 3))
        grad_tau = -inner
        grad_c = -((W @ A.unsqueeze(1)) * (G.unsqueeze(1) @ Y)).sum((1, 2, 3))
        return (
            W,
            0.5 * (grad_A + grad_A.transpose(-1, -2)),
            0.5 * (grad_G + grad_G.transpose(-1, -2)),
            grad_c,
            grad_tau,
            None,
        )


def _factor_spectrum(rows: Tensor, count: Tensor) -> Tensor:
    r"""Eigenvalues of :math:`R^\top R/c` from the smaller of :math:`R^\top R` and :math:`RR^\top`.

    ``rows`` is ``(T, n, d)``; the result has ``min(n, d)`` values per task (the other
    eigenvalues are zero). Only eigenvalues are differentiated, whose gradient is exact even
    when they repeat.
    """
    n, d = rows.shape[-2:]
    gram = rows @ rows.transpose(-1, -2) if n < d else rows.transpose(-1, -2) @ rows
    # float64: the factors are singular and float32 eigensolvers can fail to converge on them
    return torch.linalg.eigvalsh(gram.double()).to(rows.dtype) / count[:, None]


class EigenKroneckerBlock(KroneckerBlock):
    r""":math:`c\,\bar G\otimes\bar A + \tau I` with :math:`\bar A = \tilde A^\top\tilde A/c`,
    :math:`\bar G = \tilde\Gamma^\top\tilde\Gamma/c` given by their rows.

    The log determinant needs only the factors' nonzero eigenvalues, taken from the smaller
    Gram matrices (``N x N`` for a few-shot linear layer); solves and draws use the full
    eigendecompositions, computed when first needed.
    """

    def __init__(
        self,
        weight: slice,
        bias: slice | None,
        out_features: int,
        damping: Tensor,
        a_rows: Tensor,
        g_rows: Tensor,
        count: Tensor,
    ) -> None:
        super().__init__(weight, bias, out_features, damping)
        self.a_rows, self.g_rows, self.scale = a_rows, g_rows, count
        self.in_features = a_rows.shape[-1]
        self._eigen: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def A(self) -> Tensor:
        return self.a_rows.transpose(-1, -2) @ self.a_rows / self.scale[:, None, None]

    @property
    def G(self) -> Tensor:
        return self.g_rows.transpose(-1, -2) @ self.g_rows / self.scale[:, None, None]

    def logdet(self) -> Tensor:
        alpha = _factor_spectrum(self.a_rows, self.scale)  # (T, m_a)
        gamma = _factor_spectrum(self.g_rows, self.scale)  # (T, m_g)
        c, tau = self.scale, self.damping
        pairs = torch.log(
            c[:, None, None] * gamma.unsqueeze(-1) * alpha.unsqueeze(-2) + tau[:, None, None]
        )
        rest = self.out_features * self.in_features - alpha.shape[-1] * gamma.shape[-1]
        return pairs.sum((-1, -2)) + rest * tau.log()

    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detached ``(alpha, U_A, gamma, U_G)`` of the full factors."""
        if self._eigen is None:
            dtype = self.a_rows.dtype
            evals_a, evecs_a = torch.linalg.eigh(self.A.detach().double())
            evals_g, evecs_g = torch.linalg.eigh(self.G.detach().double())
            self._eigen = (
                evals_a.to(dtype),
                evecs_a.to(dtype),
                evals_g.to(dtype),
                evecs_g.to(dtype),
            )
        return self._eigen

    def spectrum(self) -> Tensor:
        """:math:`c\\gamma_k\\alpha_i + \\tau`, ``(T, out, in')``, detached."""
        evals_a, _, evals_g, _ = self.eigen()
        c, tau = self.scale.detach(), self.damping.detach()
        return c[:, None, None] * evals_g.unsqueeze(-1) * evals_a.unsqueeze(-2) + tau[:, None, None]

    def _rotate(self, m: Tensor, inverse: bool) -> Tensor:
        _, evecs_a, _, evecs_g = self.eigen()
        ug, ua = evecs_g.unsqueeze(1), evecs_a.unsqueeze(1)
        return ug @ m @ ua.transpose(-1, -2) if inverse else ug.transpose(-1, -2) @ m @ ua

    def solve_detached(self, m: Tensor) -> Tensor:
        """:math:`H^{-1}M` with every factor detached (used inside the custom backward)."""
        return self._rotate(self._rotate(m, False) / self.spectrum().unsqueeze(1), True)

    def multiply(self, m: Tensor, power: float) -> Tensor:
        if power == 1.0:
            # (c G⊗A + τI) vec_r(M) = vec_r(c G M A + τ M): exact and differentiable as written
            c = self.scale[:, None, None, None]
            return (
                c * (self.G.unsqueeze(1) @ m @ self.A.unsqueeze(1))
                + self.damping[:, None, None, None] * m
            )
        return _KroneckerSolve.apply(m, self.A, self.G, self.scale, self.damping, self)

    def sample_matrix(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        spectrum = self.spectrum()
        T, out, inp = spectrum.shape
        ref = spectrum
        z = torch.randn(T, num_samples, out, inp, generator=generator, dtype=ref.dtype).to(
            ref.device
        )
        return self._rotate(z * spectrum.unsqueeze(1).rsqrt(), True)


class KFACCurvature(CurvatureEstimate):
    r"""Block-diagonal :math:`\hat H` of Kronecker blocks plus a diagonal remainder."""

    name = "kfac"

    def __init__(self, blocks: list[KroneckerBlock], prior_precision: Tensor) -> None:
        self.blocks = blocks
        self.prior_precision = prior_precision
        covered = torch.zeros(
            prior_precision.shape[-1], dtype=torch.bool, device=prior_precision.device
        )
        for b in blocks:
            covered[b.weight] = True
            if b.bias is not None:
                covered[b.bias] = True
        self.remainder = ~covered

    def logdet(self) -> Tensor:
        total = (self.prior_precision.log() * self.remainder).sum(-1)
        for b in self.blocks:
            total = total + b.logdet()
        return total

    def _apply(self, rhs: Tensor, power: float) -> Tensor:
        D = rhs.shape[1]
        out = rhs * self.prior_precision.unsqueeze(-1) ** power * self.remainder[None, :, None]
        for b in self.blocks:
            out = out + b.from_matrix(b.multiply(b.to_matrix(rhs), power), D)
        return out

    def solve(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 2
        out = self._apply(rhs.unsqueeze(-1) if vector else rhs, -1.0)
        return out.squeeze(-1) if vector else out

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        P = self.prior_precision
        T, D = P.shape
        z = torch.randn(T, D, num_samples, generator=generator, dtype=P.dtype).to(P.device)
        out = z * P.rsqrt().unsqueeze(-1) * self.remainder[None, :, None]
        for b in self.blocks:
            out = out + b.from_matrix(b.sample_matrix(num_samples, generator), D)
        return out.permute(2, 0, 1)

    def to_dense(self) -> Tensor:
        T, D = self.prior_precision.shape
        eye = torch.eye(D, dtype=self.prior_precision.dtype, device=self.prior_precision.device)
        return self._apply(eye.expand(T, D, D), 1.0)


def _layer_scalar(precision: Tensor, sl: slice, name: str) -> Tensor:
    constant = row_constant(precision)
    if constant is not None:
        return constant.squeeze(-1)
    block = precision[:, sl]
    first = block[:, :1]
    if not torch.equal(block, first.expand_as(block)):
        raise ModelContractError(
            f"K-FAC adds the prior precision exactly only when it is constant within a layer; "
            f"layer parameter {name!r} has varying prior precisions. Use curvature='ggn' or 'diag'."
        )
    return first.squeeze(-1)


def kfac(inputs: CurvatureInputs) -> KFACCurvature:
    """Build :class:`KFACCurvature` (registered as ``"kfac"``)."""
    jac, _ = output_jacobian(inputs, method="layers")
    assert isinstance(jac, LayerJacobian)
    P = inputs.base_precision()
    mask = inputs.mask
    blocks: list[KroneckerBlock] = []
    for rec, g in zip(jac.records, jac.gtilde, strict=True):
        T, N = rec.inputs.shape[:2]
        weights = (
            mask.to(g.dtype)
            if mask is not None
            else torch.ones(T, N, dtype=g.dtype, device=g.device)
        )
        if rec.kind == "linear":
            a = rec.inputs.reshape(T, N, -1, rec.inputs.shape[-1])  # (T, N, positions, in)
            gg = g.reshape(T, N, g.shape[2], -1, g.shape[-1])  # (T, N, K, positions, out)
        else:
            patches = unfold_patches(rec.inputs, cast(nn.Conv2d, rec.module))
            a = patches.transpose(2, 3)  # (T, N, positions, in*k*k)
            gg = g.reshape(T, N, g.shape[2], g.shape[3], -1).transpose(
                3, 4
            )  # (T, N, K, positions, out)
        positions = a.shape[2]
        if rec.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        count = weights.sum(1).clamp_min(1.0) * positions  # (T,) = c
        ws = jac.layout.slice(rec.weight)
        bs = jac.layout.slice(rec.bias) if rec.bias is not None else None
        tau = _layer_scalar(P, ws, rec.weight)
        if bs is not None and not torch.equal(_layer_scalar(P, bs, rec.bias or ""), tau):
            raise ModelContractError(
                f"K-FAC needs one prior precision per layer; {rec.weight} and {rec.bias} differ"
            )
        # rows whose Gram matrices are c·A and c·G (masked points weigh zero)
        a_rows = (a * weights.sqrt()[:, :, None, None]).reshape(T, -1, a.shape[-1])
        g_rows = gg.reshape(T, -1, gg.shape[-1])
        blocks.append(EigenKroneckerBlock(ws, bs, gg.shape[-1], tau, a_rows, g_rows, count))
    return KFACCurvature(blocks, P)
