r"""The whitened output Jacobian of a network model at each task's :math:`\hat\phi` and its outputs
(:func:`output_jacobian`); the structures that hold it are in
:mod:`~hierbayes.inference.curvature.output_jacobians`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.curvature.base import CurvatureInputs
from hierbayes.inference.curvature.output_jacobians import (
    DenseJacobian,
    LayerJacobian,
    OutputJacobian,
)
from hierbayes.models.density import NetworkDensity
from hierbayes.models.network import LayerRecord

__all__ = ["DenseJacobian", "LayerJacobian", "OutputJacobian", "output_jacobian"]


def _output_factor(inputs: CurvatureInputs, phi: Tensor, f: Tensor) -> Tensor:
    """``L`` with ``Λ = L Lᵀ`` per point, ``(T, N, C, K)``."""
    return _network_density(inputs.density).output_factor(inputs.params, phi, f)


def _network_density(density: object) -> NetworkDensity:
    if not isinstance(density, NetworkDensity):
        raise ModelContractError(
            "output Jacobians need a network model (the NetworkDensity protocol: a hierbayes "
            "TaskModel such as NeuralRegression); for another Pyro program use "
            "curvature='ggn', 'diag' or 'full'"
        )
    return density


def output_jacobian(
    inputs: CurvatureInputs,
    *,
    x: Tensor | None = None,
    mask: Tensor | None = None,
    whiten: bool = True,
    method: str = "auto",
) -> tuple[OutputJacobian, Tensor]:
    r"""The (whitened) output Jacobian at ``inputs.phi`` and the outputs ``f`` ``(T, N, C)``.

    Parameters
    ----------
    x, mask:
        Inputs at which to differentiate (default: ``inputs.x``, ``inputs.mask``).
    whiten:
        Multiply each point's rows by :math:`L_n^\top` (:math:`\Lambda_n = L_nL_n^\top`); off
        for the Jacobian of predictions.
    method:
        ``"layers"`` (records; needs a ``Linear``/``Conv2d`` stack without batch norm),
        ``"autograd"`` (any network) or ``"auto"`` (layers when possible).
    """
    x = inputs.x if x is None else x
    mask = inputs.mask if x is inputs.x and mask is None else mask
    density = _network_density(inputs.density)
    network = density.network
    phi = inputs.phi
    cg = inputs.create_graph
    has_bn = network.has_batch_norm
    use_layers = method == "layers" or (method == "auto" and network.has_fast_path and not has_bn)
    if method == "layers" and (not network.has_fast_path or has_bn):
        raise NotImplementedError(
            "layer-wise Jacobians need a Linear/Conv2d stack without batch norm (batch "
            "statistics couple the points); use method='autograd'"
        )
    given = inputs.precomputed
    if given is not None and whiten and x is inputs.x and mask is inputs.mask:
        jac_given, f_given = given
        if not use_layers or isinstance(jac_given, LayerJacobian):
            return jac_given, f_given
    with torch.enable_grad():
        if not phi.requires_grad:
            phi = phi.detach().requires_grad_(True)
        if use_layers:
            f, records = density.outputs_with_records(inputs.params, phi, x)
        else:
            f, records = density.outputs(inputs.params, phi, x), []
        T, N = f.shape[:2]
        f3 = f.reshape(T, N, -1)
        C = f3.shape[-1]
        factor = _output_factor(inputs, phi, f3) if whiten else None
        if use_layers:
            # seed (T, N, K, C): row k of L^T, so the back-propagated gradients come whitened
            eye = torch.eye(C, dtype=f3.dtype, device=f3.device).expand(T, N, C, C)
            seed = (factor if factor is not None else eye).transpose(-1, -2)
            net_phi = phi[:, : network.num_params]
            explicit = network.output_gradients(net_phi, records, seed)
            gtilde = []
            for layer in range(len(records)):
                if explicit is not None:
                    g = explicit[layer]
                else:
                    if layer == 0:
                        outs = [r.outputs for r in records]
                        per_output = [
                            torch.autograd.grad(
                                f3[..., c].sum(), outs, create_graph=cg, retain_graph=True
                            )
                            for c in range(C)
                        ]
                    g = torch.stack(
                        [per_output[c][layer] for c in range(C)], dim=2
                    )  # (T, N, C, *out)
                    if factor is not None:
                        tail = g.shape[3:]
                        g = torch.einsum("tnco,tnck->tnko", g.reshape(T, N, C, -1), factor).reshape(
                            T, N, -1, *tail
                        )
                if mask is not None:
                    g = g * mask.reshape(T, N, *([1] * (g.dim() - 2))).to(g.dtype)
                if not cg:
                    g = g.detach()
                gtilde.append(g)
            jac: OutputJacobian = LayerJacobian(
                [_detach_record(r) if not cg else r for r in records],
                gtilde,
                network.layout,
                phi.shape[1],
            )
        else:
            R = N * C
            eye = (
                torch.eye(R, dtype=f3.dtype, device=f3.device)
                .reshape(R, 1, N, C)
                .expand(R, T, N, C)
            )
            (J,) = torch.autograd.grad(
                f3, phi, grad_outputs=eye, is_grads_batched=True, create_graph=cg
            )
            J = J.permute(1, 0, 2).reshape(T, N, C, -1)  # (T, N, C, D)
            if factor is not None:
                J = torch.einsum("tncd,tnck->tnkd", J, factor)
            if mask is not None:
                J = J * mask.reshape(T, N, 1, 1).to(J.dtype)
            jac = DenseJacobian(
                J.reshape(T, -1, J.shape[-1]) if cg else J.reshape(T, -1, J.shape[-1]).detach()
            )
    return jac, (f3 if cg else f3.detach())


def _detach_record(rec: LayerRecord) -> LayerRecord:
    return LayerRecord(
        rec.name,
        rec.kind,
        rec.weight,
        rec.bias,
        rec.inputs.detach(),
        rec.outputs.detach(),
        rec.module,
    )
