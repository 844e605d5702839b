r"""Whitened output Jacobians :math:`\tilde J = L^\top \partial f / \partial\phi` and their Gram matrices.

The generalised Gauss--Newton matrix of a task (Schraudolph 2002; Martens 2020) is

.. math::

    G = J^\top \Lambda J = \tilde J^\top \tilde J, \qquad \Lambda_n = L_n L_n^\top,

with :math:`J` the Jacobian of the ``N x C`` network outputs with respect to :math:`\phi` and
:math:`\Lambda_n` the Hessian of :math:`-\log p(y_n\mid f_n)` in :math:`f_n`
(:math:`I/\sigma^2` for a Gaussian, :math:`\operatorname{diag}(p)-pp^\top` for a softmax).
Few-shot tasks have few rows ``R = N·K`` and many columns ``D``, so everything downstream works
with ``R x R`` Gram matrices :math:`\tilde J P^{-1} \tilde J^\top`.

Two implementations:

* :class:`LayerJacobian` reads each ``Linear``/``Conv2d`` layer's input :math:`a` and the
  gradient :math:`g` of the outputs with respect to its pre-activation (``C`` backward passes
  in all). A linear layer's rows are :math:`g_{n,k}\otimes a_n`, so its Gram matrix is
  :math:`(a_n^\top a_m / p_W + 1/p_b)(g_{n,k}^\top g_{m,k'})` without forming the Jacobian;
  convolutions form per-example weight gradients from unfolded patches.
* :class:`DenseJacobian` gets every row by reverse-mode autograd (``is_grads_batched``), for
  any network, batch norm included.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import cast

import torch
from torch import Tensor, nn

from hierbayes.inference.curvature.base import row_constant
from hierbayes.models.network import LayerRecord, ParameterLayout, unfold_patches

__all__ = ["DenseJacobian", "LayerJacobian", "OutputJacobian"]


class OutputJacobian(ABC):
    r"""A batch of whitened Jacobians :math:`\tilde J_j` of shape ``(R, D)``."""

    num_tasks: int
    num_rows: int
    num_params: int

    @abstractmethod
    def dense(self) -> Tensor:
        r""":math:`\tilde J` as a dense ``(T, R, D)`` tensor."""

    @abstractmethod
    def gram(self, inv_precision: Tensor, other: OutputJacobian | None = None) -> Tensor:
        r""":math:`\tilde J P^{-1} \tilde J'^\top`, ``(T, R, R')`` (``other`` defaults to self).

        ``inv_precision`` is the diagonal of :math:`P^{-1}`, ``(T, D)``.
        """

    @abstractmethod
    def gram_diag(self, inv_precision: Tensor) -> Tensor:
        r"""The diagonal of :math:`\tilde J P^{-1}\tilde J^\top`, ``(T, R)``."""

    @abstractmethod
    def column_square_sums(self) -> Tensor:
        r""":math:`\sum_r \tilde J_{rd}^2`, the diagonal of the GGN, ``(T, D)``."""

    def matvec(self, v: Tensor) -> Tensor:
        r""":math:`\tilde J v` for ``v`` ``(T, D)`` or ``(T, D, K)``."""
        J = self.dense()
        return J @ v if v.dim() == 3 else (J @ v.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, u: Tensor) -> Tensor:
        r""":math:`\tilde J^\top u` for ``u`` ``(T, R)`` or ``(T, R, K)``."""
        Jt = self.dense().transpose(1, 2)
        return Jt @ u if u.dim() == 3 else (Jt @ u.unsqueeze(-1)).squeeze(-1)


class DenseJacobian(OutputJacobian):
    """An explicit ``(T, R, D)`` Jacobian."""

    def __init__(self, J: Tensor) -> None:
        self.J = J
        self.num_tasks, self.num_rows, self.num_params = J.shape

    def dense(self) -> Tensor:
        return self.J

    def gram(self, inv_precision: Tensor, other: OutputJacobian | None = None) -> Tensor:
        right = self.J if other is None else other.dense()
        return (self.J * inv_precision.unsqueeze(1)) @ right.transpose(1, 2)

    def gram_diag(self, inv_precision: Tensor) -> Tensor:
        return (self.J.square() * inv_precision.unsqueeze(1)).sum(-1)

    def column_square_sums(self) -> Tensor:
        return self.J.square().sum(1)


class LayerJacobian(OutputJacobian):
    r"""The Jacobian of a ``Linear``/``Conv2d`` stack, kept as layer inputs and output gradients.

    ``gtilde[l]`` is ``(T, N, K, *out_shape)``: the whitened gradient of each output row with
    respect to layer ``l``'s pre-activation. Parameters of no recorded layer (there are none in
    networks made only of these layers and activations) have zero Jacobian columns.
    """

    def __init__(
        self,
        records: list[LayerRecord],
        gtilde: list[Tensor],
        layout: ParameterLayout,
        num_params: int | None = None,
    ) -> None:
        self.records = records
        self.gtilde = gtilde
        self.layout = layout
        first = gtilde[0]
        self.num_tasks = int(first.shape[0])
        self.points, self.outputs_per_point = int(first.shape[1]), int(first.shape[2])
        self.num_rows = self.points * self.outputs_per_point
        # phi may hold more than the network's parameters (a likelihood's per-task ones) after them
        self.num_params = layout.num_params if num_params is None else num_params
        self._dense: Tensor | None = None
        self._blocks: list[tuple[slice, slice | None, Tensor, Tensor | None]] | None = None

    # -- per-layer pieces -----------------------------------------------------------------------

    def _conv_blocks(self, rec: LayerRecord, g: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row weight and bias gradients of a convolution: ``(T, R, out*in*k*k)``, ``(T, R, out)``."""
        T, N = rec.inputs.shape[:2]
        patches = unfold_patches(rec.inputs, cast(nn.Conv2d, rec.module))  # (T, N, in*k*k, P)
        gk = g.reshape(T, N, g.shape[2], g.shape[3], -1)  # (T, N, K, out, positions)
        w = torch.einsum("tnkop,tnip->tnkoi", gk, patches).reshape(T, self.num_rows, -1)
        b = gk.sum(-1).reshape(T, self.num_rows, -1)
        return w, b

    def _linear_inputs(self, rec: LayerRecord) -> Tensor:
        a = rec.inputs
        if a.dim() != 3:
            raise NotImplementedError(
                "linear layers on inputs with extra dimensions have no Gram form"
            )
        return a

    def blocks(self) -> list[tuple[slice, slice | None, Tensor, Tensor | None]]:
        """Explicit ``(weight slice, bias slice, weight rows, bias rows)`` per layer."""
        if self._blocks is None:
            blocks = []
            for rec, g in zip(self.records, self.gtilde, strict=True):
                ws = self.layout.slice(rec.weight)
                bs = self.layout.slice(rec.bias) if rec.bias is not None else None
                if rec.kind == "linear":
                    a = self._linear_inputs(rec)
                    T = a.shape[0]
                    w = (g.unsqueeze(-1) * a[:, :, None, None, :]).reshape(T, self.num_rows, -1)
                    b = g.reshape(T, self.num_rows, -1)
                else:
                    w, b = self._conv_blocks(rec, g)
                blocks.append((ws, bs, w, b if bs is not None else None))
            self._blocks = blocks
        return self._blocks

    def dense(self) -> Tensor:
        if self._dense is None:
            T = self.num_tasks
            ref = self.gtilde[0]
            J = ref.new_zeros(T, self.num_rows, self.num_params)
            pieces = []
            for ws, bs, w, b in self.blocks():
                pieces.append((ws, w))
                if bs is not None and b is not None:
                    pieces.append((bs, b))
            # assemble without in-place writes, so autograd sees a plain concatenation
            order = sorted(pieces, key=lambda p: p[0].start)
            cols, cursor = [], 0
            for sl, block in order:
                if sl.start > cursor:
                    cols.append(J[:, :, cursor : sl.start])
                cols.append(block)
                cursor = sl.stop
            if cursor < self.num_params:
                cols.append(J[:, :, cursor:])
            self._dense = torch.cat(cols, dim=-1)
        return self._dense

    @staticmethod
    def _layer_scalar(inv_precision: Tensor, sl: slice) -> Tensor | None:
        """The layer's inverse precision as ``(T, 1, 1)`` if constant over ``sl``, else ``None``."""
        constant = row_constant(inv_precision)
        if constant is not None:
            return constant.unsqueeze(-1)
        block = inv_precision[:, sl]
        first = block[:, :1]
        if not torch.equal(block, first.expand_as(block)):
            return None
        return first.unsqueeze(-1)

    def _gram_trick(self, index: int, inv_precision: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """``(c_W, c_b)`` ``(T, 1, 1)`` if layer ``index`` is linear on ``(T, N, in)`` inputs with
        a constant inverse precision per weight and per bias, else ``None``."""
        rec = self.records[index]
        if rec.kind != "linear" or rec.inputs.dim() != 3:
            return None
        cw = self._layer_scalar(inv_precision, self.layout.slice(rec.weight))
        if cw is None:
            return None
        if rec.bias is None:
            return cw, None
        cb = self._layer_scalar(inv_precision, self.layout.slice(rec.bias))
        return None if cb is None else (cw, cb)

    def _explicit_gram(self, index: int, inv_precision: Tensor, other: LayerJacobian) -> Tensor:
        """One layer's Gram matrix from its per-row weight and bias gradients (convolutions,
        or precisions that vary within the layer)."""
        ws, bs, w, b = self.blocks()[index]
        _, _, w2, b2 = other.blocks()[index]
        term = (w * inv_precision[:, ws].unsqueeze(1)) @ w2.transpose(1, 2)
        if bs is not None and b is not None and b2 is not None:
            term = term + (b * inv_precision[:, bs].unsqueeze(1)) @ b2.transpose(1, 2)
        return term

    def gram(self, inv_precision: Tensor, other: OutputJacobian | None = None) -> Tensor:
        other_layers = self if other is None else other
        if not isinstance(other_layers, LayerJacobian):
            return DenseJacobian(self.dense()).gram(inv_precision, other)
        total: Tensor | None = None
        for index, (rec, g, rec2, g2) in enumerate(
            zip(self.records, self.gtilde, other_layers.records, other_layers.gtilde, strict=True)
        ):
            scalars = self._gram_trick(index, inv_precision)
            if scalars is None:
                term = self._explicit_gram(index, inv_precision, other_layers)
            else:
                cw, cb = scalars
                T = g.shape[0]
                aa = rec.inputs @ rec2.inputs.transpose(1, 2)  # (T, N, N')
                coef = aa * cw if cb is None else aa * cw + cb
                k1, k2 = g.shape[2], g2.shape[2]
                if k1 > 1 or k2 > 1:
                    coef = coef.repeat_interleave(k1, dim=1).repeat_interleave(k2, dim=2)
                gg = g.reshape(T, -1, g.shape[-1]) @ g2.reshape(T, -1, g2.shape[-1]).transpose(1, 2)
                term = coef * gg
            total = term if total is None else total + term
        assert total is not None
        return total

    def gram_diag(self, inv_precision: Tensor) -> Tensor:
        total: Tensor | None = None
        for index, (rec, g) in enumerate(zip(self.records, self.gtilde, strict=True)):
            scalars = self._gram_trick(index, inv_precision)
            if scalars is None:
                ws, bs, w, b = self.blocks()[index]
                term = (w.square() * inv_precision[:, ws].unsqueeze(1)).sum(-1)
                if bs is not None and b is not None:
                    term = term + (b.square() * inv_precision[:, bs].unsqueeze(1)).sum(-1)
            else:
                cw, cb = scalars
                T = g.shape[0]
                aa = rec.inputs.square().sum(-1, keepdim=True)  # (T, N, 1)
                coef = aa * cw[:, :, :1] if cb is None else aa * cw[:, :, :1] + cb[:, :, :1]
                term = (coef * g.square().sum(-1)).reshape(T, -1)
            total = term if total is None else total + term
        assert total is not None
        return total

    def column_square_sums(self) -> Tensor:
        T = self.num_tasks
        ref = self.gtilde[0]
        out = ref.new_zeros(T, self.num_params)
        pieces = []
        for rec, g in zip(self.records, self.gtilde, strict=True):
            ws = self.layout.slice(rec.weight)
            bs = self.layout.slice(rec.bias) if rec.bias is not None else None
            if rec.kind == "linear" and rec.inputs.dim() == 3:
                g2 = g.square().sum(2)  # (T, N, out): sum over whitened outputs
                w = (g2.transpose(1, 2) @ rec.inputs.square()).reshape(T, -1)
                b = g2.sum(1)
            else:
                wr, br = self._conv_blocks(rec, g)
                w, b = wr.square().sum(1), br.square().sum(1)
            pieces.append((ws, w))
            if bs is not None:
                pieces.append((bs, b))
        cols, cursor = [], 0
        for sl, block in sorted(pieces, key=lambda p: p[0].start):
            if sl.start > cursor:
                cols.append(out[:, cursor : sl.start])
            cols.append(block)
            cursor = sl.stop
        if cursor < self.num_params:
            cols.append(out[:, cursor:])
        return torch.cat(cols, dim=-1)
