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
precision :math:`\tau_l` (constant within a layer) is added exactly. Two representations of
:math:`c\,\bar G\otimes\bar A + \tau I`, chosen per layer:

* **low rank** (``Linear`` layers of few-shot tasks): :math:`\bar A = \tilde A^\top\tilde A/N`
  and :math:`\bar G = \tilde\Gamma\tilde\Gamma^\top/N` have ranks at most ``N`` and ``N·K``, so
  :math:`c\,\bar G\otimes\bar A = ZZ^\top` with :math:`Z = \sqrt c\,(\tilde\Gamma\otimes\tilde A^\top)/N`
  of ``N²K`` columns, and

  .. math::

      \log\det(ZZ^\top + \tau I) = D_l\log\tau + \log\det(I + Z^\top Z/\tau),\quad
      Z^\top Z = \tfrac{c}{N^2}(\tilde\Gamma^\top\tilde\Gamma)\otimes(\tilde A\tilde A^\top),

  with Woodbury solves; every step is a Cholesky factorisation, so gradients are exact even
  though the factors are singular;
* **eigen** (convolutions, or too many columns): with
  :math:`\bar A = U_A\operatorname{diag}(\alpha)U_A^\top`, :math:`\bar G = U_G\operatorname{diag}(\gamma)U_G^\top`,

  .. math::

      \log\det(c\,\bar G\otimes\bar A + \tau I) = \sum_k\sum_i \log(c\,\gamma_k\alpha_i + \tau)

  (MATH.md §4) and solves act on the ``out x in`` weight matrix as
  :math:`U_G[(U_G^\top V U_A) \oslash (c\gamma\alpha^\top + \tau)]U_A^\top`. The log
  determinant's gradient is exact; gradients of solves go through eigenvectors and use
  :func:`~hierbayes.inference.curvature.linalg.symmetric_eigh` (approximate inside degenerate
  eigenspaces).

Parameters of no ``Linear``/``Conv2d`` layer (batch norm) keep only the prior precision, as in
the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature.base import CurvatureEstimate, CurvatureInputs, cholesky_logdet, safe_cholesky
from hierbayes.inference.curvature.jacobian import LayerJacobian, output_jacobian
from hierbayes.inference.curvature.linalg import symmetric_eigh

__all__ = ["EigenKroneckerBlock", "KFACCurvature", "KroneckerBlock", "LowRankKroneckerBlock", "kfac"]

#: Largest number of low-rank columns ``N²K`` for which a Linear layer uses the low-rank form.
LOW_RANK_LIMIT = 400


class KroneckerBlock:
    r"""One layer's :math:`c\,\bar G\otimes\bar A + \tau I`, acting on ``[W | b]`` (``out x in'``)."""

    def __init__(self, weight: slice, bias: slice | None, out_features: int, damping: Tensor) -> None:
        self.weight, self.bias, self.out_features, self.damping = weight, bias, out_features, damping

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


class LowRankKroneckerBlock(KroneckerBlock):
    r""":math:`ZZ^\top + \tau I` with :math:`Z = \sqrt c\,(\tilde\Gamma\otimes\tilde A^\top)/N`."""

    def __init__(
        self, weight: slice, bias: slice | None, out_features: int, damping: Tensor,
        a_rows: Tensor, g_cols: Tensor, scale: Tensor, count: Tensor,
    ) -> None:
        super().__init__(weight, bias, out_features, damping)
        self.a_rows = a_rows  # (T, N, in')      rows of A~ (mask-weighted)
        self.g_cols = g_cols  # (T, out, N*K)    columns of Gamma~
        self.coef = scale.sqrt() / count  # (T,)
        gram_g = g_cols.transpose(1, 2) @ g_cols  # (T, NK, NK)
        gram_a = a_rows @ a_rows.transpose(1, 2)  # (T, N, N)
        T = gram_a.shape[0]
        ztz = torch.einsum("tij,tkl->tikjl", gram_g, gram_a).reshape(T, gram_g.shape[1] * gram_a.shape[1], -1)
        ztz = ztz * self.coef[:, None, None].square()
        self.size = out_features * a_rows.shape[-1]
        eye = torch.eye(ztz.shape[-1], dtype=ztz.dtype, device=ztz.device)
        self.inner = ztz + damping[:, None, None] * eye  # tau I + Z^T Z
        self.chol = safe_cholesky(self.inner, "the K-FAC low-rank block")

    def _zt(self, m: Tensor) -> Tensor:
        """:math:`Z^\\top\\operatorname{vec}(M)`: ``(T, S, out, in')`` to ``(T, NK*N, S)``."""
        T, S = m.shape[:2]
        u = self.g_cols.transpose(1, 2).unsqueeze(1) @ m @ self.a_rows.transpose(1, 2).unsqueeze(1)  # (T,S,NK,N)
        return (self.coef[:, None, None, None] * u).reshape(T, S, -1).transpose(1, 2)

    def _z(self, u: Tensor) -> Tensor:
        """:math:`Z u`: ``(T, NK*N, S)`` to ``(T, S, out, in')``."""
        T, _, S = u.shape
        nk, n = self.g_cols.shape[-1], self.a_rows.shape[1]
        um = u.transpose(1, 2).reshape(T, S, nk, n)
        out = self.g_cols.unsqueeze(1) @ um @ self.a_rows.unsqueeze(1)
        return self.coef[:, None, None, None] * out

    def logdet(self) -> Tensor:
        tau = self.damping
        r = self.inner.shape[-1]
        # det(ZZ^T + tau I_D) = tau^(D - r) det(tau I_r + Z^T Z)
        return (self.size - r) * tau.log() + cholesky_logdet(self.chol)

    def multiply(self, m: Tensor, power: float) -> Tensor:
        tau = self.damping[:, None, None, None]
        if power == 1.0:
            return self._z(self._zt(m)) + tau * m
        w = torch.cholesky_solve(self._zt(m), self.chol)
        return (m - self._z(w)) / tau

    def sample_matrix(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        T = self.a_rows.shape[0]
        shape = (T, num_samples, self.out_features, self.a_rows.shape[-1])
        ref = self.a_rows
        z = torch.randn(shape, generator=generator, dtype=ref.dtype).to(ref.device)
        e = torch.randn(T, self.inner.shape[-1], num_samples, generator=generator, dtype=ref.dtype).to(ref.device)
        rhs = self.damping.sqrt()[:, None, None, None] * z + self._z(e)
        return self.multiply(rhs, -1.0)


class EigenKroneckerBlock(KroneckerBlock):
    r""":math:`(U_G\otimes U_A)\operatorname{diag}(c\gamma\alpha^\top+\tau)(U_G\otimes U_A)^\top`."""

    def __init__(
        self, weight: slice, bias: slice | None, out_features: int, damping: Tensor,
        A: Tensor, G: Tensor, scale: Tensor,
    ) -> None:
        super().__init__(weight, bias, out_features, damping)
        self.scale = scale
        self.evals_a, self.evecs_a = symmetric_eigh(A)
        self.evals_g, self.evecs_g = symmetric_eigh(G)

    def spectrum(self) -> Tensor:
        """:math:`c\\gamma_k\\alpha_i + \\tau`, ``(T, out, in')``."""
        return (
            self.scale[:, None, None] * self.evals_g.unsqueeze(-1) * self.evals_a.unsqueeze(-2)
            + self.damping[:, None, None]
        )

    def logdet(self) -> Tensor:
        return self.spectrum().log().sum((-1, -2))

    def _rotate(self, m: Tensor, inverse: bool) -> Tensor:
        ug, ua = self.evecs_g.unsqueeze(1), self.evecs_a.unsqueeze(1)
        return ug @ m @ ua.transpose(-1, -2) if inverse else ug.transpose(-1, -2) @ m @ ua

    def multiply(self, m: Tensor, power: float) -> Tensor:
        return self._rotate(self._rotate(m, False) * self.spectrum().unsqueeze(1) ** power, True)

    def sample_matrix(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        T, out, inp = self.spectrum().shape
        ref = self.evecs_a
        z = torch.randn(T, num_samples, out, inp, generator=generator, dtype=ref.dtype).to(ref.device)
        return self._rotate(z * self.spectrum().unsqueeze(1).rsqrt(), True)


class KFACCurvature(CurvatureEstimate):
    r"""Block-diagonal :math:`\hat H` of Kronecker blocks plus a diagonal remainder."""

    name = "kfac"

    def __init__(self, blocks: list[KroneckerBlock], prior_precision: Tensor) -> None:
        self.blocks = blocks
        self.prior_precision = prior_precision
        covered = torch.zeros(prior_precision.shape[-1], dtype=torch.bool, device=prior_precision.device)
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
    block = precision[:, sl]
    first = block[:, :1]
    if not torch.equal(block, first.expand_as(block)):
        raise ModelContractError(
            f"K-FAC adds the prior precision exactly only when it is constant within a layer; "
            f"layer parameter {name!r} has varying prior precisions. Use curvature='ggn' or 'diag'."
        )
    return first.squeeze(-1)


def kfac(inputs: CurvatureInputs, *, representation: str = "auto") -> KFACCurvature:
    """Build :class:`KFACCurvature` (registered as ``"kfac"``).

    ``representation``: ``"auto"`` (low rank for ``Linear`` layers with at most
    :data:`LOW_RANK_LIMIT` columns, eigen otherwise), ``"lowrank"`` or ``"eigen"``.
    """
    jac, _ = output_jacobian(inputs, method="layers")
    assert isinstance(jac, LayerJacobian)
    P = inputs.prior_precision_matrix()
    mask = inputs.mask
    blocks: list[KroneckerBlock] = []
    for rec, g in zip(jac.records, jac.gtilde, strict=True):
        T, N = rec.inputs.shape[:2]
        weights = mask.to(g.dtype) if mask is not None else torch.ones(T, N, dtype=g.dtype, device=g.device)
        if rec.kind == "linear":
            a = rec.inputs.reshape(T, N, -1, rec.inputs.shape[-1])  # (T, N, positions, in)
            gg = g.reshape(T, N, g.shape[2], -1, g.shape[-1])  # (T, N, K, positions, out)
        else:
            conv = rec.module
            patches = F.unfold(
                rec.inputs.reshape(T * N, *rec.inputs.shape[2:]), conv.kernel_size,
                dilation=conv.dilation, padding=conv.padding, stride=conv.stride,  # type: ignore[arg-type]
            )
            a = patches.reshape(T, N, patches.shape[1], -1).transpose(2, 3)  # (T, N, positions, in*k*k)
            gg = g.reshape(T, N, g.shape[2], g.shape[3], -1).transpose(3, 4)  # (T, N, K, positions, out)
        positions, K = a.shape[2], gg.shape[2]
        if rec.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        count = weights.sum(1).clamp_min(1.0) * positions  # (T,) = c
        ws = jac.layout.slice(rec.weight)
        bs = jac.layout.slice(rec.bias) if rec.bias is not None else None
        tau = _layer_scalar(P, ws, rec.weight)
        if bs is not None and not torch.equal(_layer_scalar(P, bs, rec.bias or ""), tau):
            raise ModelContractError(f"K-FAC needs one prior precision per layer; {rec.weight} and {rec.bias} differ")
        out = gg.shape[-1]
        low_rank_cols = N * positions * N * positions * K
        use_low_rank = representation == "lowrank" or (
            representation == "auto" and positions == 1 and low_rank_cols <= LOW_RANK_LIMIT
        )
        if use_low_rank:
            a_rows = (a * weights.sqrt()[:, :, None, None]).reshape(T, N * positions, -1)
            g_cols = gg.permute(0, 4, 1, 2, 3).reshape(T, out, -1)
            blocks.append(LowRankKroneckerBlock(ws, bs, out, tau, a_rows, g_cols, count, count))
        else:
            aw = a * weights[:, :, None, None]
            A = torch.einsum("tnpi,tnpj->tij", aw, a) / count[:, None, None]
            G = torch.einsum("tnkpo,tnkpq->toq", gg, gg) / count[:, None, None]
            blocks.append(EigenKroneckerBlock(ws, bs, out, tau, A, G, count))
    return KFACCurvature(blocks, P)
