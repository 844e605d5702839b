r"""The torch interpreter of a network plan: one function per step kind, batched over tasks.

Each function runs one :mod:`~hierbayes.models.network_plan` step on ``h`` ``(T, N, ...)``,
every task with its own parameters ``{name: (T, *shape)}`` (batched matrix products and
grouped convolutions); :func:`torch_step` dispatches on the step's ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hierbayes.models.network_plan import (
    ActivationStep,
    BatchNormStep,
    Conv2dStep,
    FlattenStep,
    LinearStep,
    PlanStep,
    PoolStep,
)

__all__ = ["torch_step"]


def _linear(step: LinearStep, a: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """``a`` ``(T, N, ..., in)``, weight ``(T, out, in)``, bias ``(T, out)``."""
    w = params[step.weight]
    b = None if step.bias is None else params[step.bias]
    flat = a if a.dim() == 3 else a.reshape(a.shape[0], -1, a.shape[-1])
    if b is None:
        y = torch.bmm(flat, w.transpose(1, 2))
    else:
        y = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
    return y if a.dim() == 3 else y.reshape(*a.shape[:-1], w.shape[1])


def _conv2d(step: Conv2dStep, a: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Grouped convolution: task ``t``'s filters see only task ``t``'s channels."""
    w = params[step.weight]  # (T, out, in, kh, kw)
    b = None if step.bias is None else params[step.bias]
    T, N = a.shape[0], a.shape[1]
    c_out = w.shape[1]
    x = a.transpose(0, 1).reshape(N, T * a.shape[2], *a.shape[3:])
    y = F.conv2d(
        x,
        w.reshape(T * c_out, *w.shape[2:]),
        None if b is None else b.reshape(T * c_out),
        stride=step.stride,
        padding=step.padding,
        dilation=step.dilation,
        groups=T,
    )
    return y.reshape(N, T, c_out, *y.shape[2:]).transpose(0, 1)


def _batch_norm(step: BatchNormStep, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Normalise with each task's own batch statistics over points (and spatial positions).

    The tasks' channels are folded into one batch-norm call of ``T·C`` channels (the layout
    the grouped convolution produces), which is torch's fused kernel, forward and backward.
    """
    T, N, C = h.shape[0], h.shape[1], h.shape[2]
    if N * h[0, 0, 0].numel() == 1:  # one value per channel: torch's kernel refuses it
        return _batch_norm_by_hand(step, h, params)
    x = h.transpose(0, 1).reshape(N, T * C, *h.shape[3:])
    weight = None if step.weight is None else params[step.weight].reshape(T * C)
    bias = None if step.bias is None else params[step.bias].reshape(T * C)
    y = F.batch_norm(x, None, None, weight, bias, training=True, eps=step.eps)
    return y.reshape(N, T, C, *h.shape[3:]).transpose(0, 1)


def _batch_norm_by_hand(step: BatchNormStep, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    T, C = h.shape[0], h.shape[2]
    reduce_dims = [1, *range(3, h.dim())]
    mean = h.mean(dim=reduce_dims, keepdim=True)
    var = h.var(dim=reduce_dims, keepdim=True, unbiased=False)
    y = (h - mean) / torch.sqrt(var + step.eps)
    shape = (T, 1, C) + (1,) * (h.dim() - 3)
    if step.weight is not None:
        y = y * params[step.weight].reshape(shape)
    if step.bias is not None:
        y = y + params[step.bias].reshape(shape)
    return y


def _pool(step: PoolStep, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Pooling over each task's points, folded into one batch."""
    T, n = h.shape[:2]
    x = h.reshape(T * n, *h.shape[2:])
    if step.op == "max":
        y = F.max_pool2d(
            x, step.kernel_size, step.stride, step.padding, step.dilation, step.ceil_mode
        )
    else:
        y = F.avg_pool2d(
            x,
            step.kernel_size,
            step.stride,
            step.padding,
            step.ceil_mode,
            step.count_include_pad,
            step.divisor_override,
        )
    return y.reshape(T, n, *y.shape[1:])


def _flatten(step: FlattenStep, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    return h.reshape(h.shape[0], h.shape[1], -1)


_TORCH_ACTIVATIONS: dict[str, Callable[..., Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "identity": lambda h: h,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def _activation(step: ActivationStep, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    return _TORCH_ACTIVATIONS[step.name](h, **step.kwargs)


_TORCH_STEPS: dict[str, Callable[[Any, Tensor, Mapping[str, Tensor]], Tensor]] = {
    LinearStep.kind: _linear,
    Conv2dStep.kind: _conv2d,
    BatchNormStep.kind: _batch_norm,
    PoolStep.kind: _pool,
    FlattenStep.kind: _flatten,
    ActivationStep.kind: _activation,
}


def torch_step(step: PlanStep, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    r"""Run one step on a batch of tasks: ``h`` ``(T, N, ...)`` with each task's parameters
    ``params`` ``{name: (T, *shape)}`` (``ParameterLayout.unflatten`` of :math:`\phi`)."""
    return _TORCH_STEPS[step.kind](step, h, params)
