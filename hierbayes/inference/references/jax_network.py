r"""A network model's fast-path plan as a JAX function of one task's parameters.

:func:`jax_network` interprets the model's plan (:attr:`~hierbayes.models.network.BatchedNetwork.plan`,
the description the torch fast path runs) step by step, with one table from step kind to a
``jax.numpy`` implementation; every parameter is read by name from :math:`\phi` through the
model's :class:`~hierbayes.models.network.ParameterLayout`. Batch norm uses the statistics of the
task's real points (a ``mask`` leaves padded points out). JAX is optional: it is imported when a
function here is called, never at package import.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from hierbayes.models.network import ParameterLayout
from hierbayes.models.network_plan import (
    ActivationStep,
    BatchNormStep,
    Conv2dStep,
    FlattenStep,
    LinearStep,
    PlanStep,
    PoolStep,
)
from hierbayes.models.task_model import TaskModel

__all__ = ["JAX_INSTALL_HINT", "jax_network", "require_jax"]


#: What the ImportError says when JAX or NumPyro is missing.
JAX_INSTALL_HINT = (
    'this needs JAX and NumPyro, which hierbayes leaves optional: pip install "hierbayes[jax]"'
)


def require_jax() -> tuple[ModuleType, ModuleType]:
    """``(jax, jax.numpy)``, or an :class:`ImportError` saying how to install them."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as err:  # pragma: no cover - exercised only without JAX
        raise ImportError(JAX_INSTALL_HINT) from err
    return jax, jnp


# -- the network: one JAX function per plan step kind ------------------------------------------
# Each maps (step, h (N, ...), {name: array}, mask (N,) or None) to the next h, for one task.


def _linear(step: LinearStep, h: Any, p: Mapping[str, Any], mask: Any) -> Any:
    h = h @ p[step.weight].T
    return h if step.bias is None else h + p[step.bias]


def _conv2d(step: Conv2dStep, h: Any, p: Mapping[str, Any], mask: Any) -> Any:
    from jax import lax

    (ph, pw) = step.padding
    y = lax.conv_general_dilated(
        h,
        p[step.weight],
        window_strides=step.stride,
        padding=((ph, ph), (pw, pw)),
        rhs_dilation=step.dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )
    return y if step.bias is None else y + p[step.bias][:, None, None]


def _batch_norm(step: BatchNormStep, h: Any, p: Mapping[str, Any], mask: Any) -> Any:
    _, jnp = require_jax()
    axes = (0, *range(2, h.ndim))  # points and positions, per channel
    if mask is None:
        mean = h.mean(axis=axes, keepdims=True)
        var = ((h - mean) ** 2).mean(axis=axes, keepdims=True)
    else:  # the statistics of the task's real points only
        m = mask.reshape((-1,) + (1,) * (h.ndim - 1)).astype(h.dtype)
        count = m.sum() * math.prod(h.shape[2:])
        mean = (h * m).sum(axis=axes, keepdims=True) / count
        var = (((h - mean) ** 2) * m).sum(axis=axes, keepdims=True) / count
    y = (h - mean) / jnp.sqrt(var + step.eps)
    shape = (1, h.shape[1]) + (1,) * (h.ndim - 2)
    if step.weight is not None:
        y = y * p[step.weight].reshape(shape)
    if step.bias is not None:
        y = y + p[step.bias].reshape(shape)
    return y


def _pool_extra(size: int, k: int, s: int, pad: int, d: int, ceil_mode: bool) -> int:
    """Padding past ``pad`` on the far side that torch's ``ceil_mode`` adds (0 without it)."""
    span = size + 2 * pad - d * (k - 1) - 1
    if not ceil_mode:
        return 0
    out = -(-span // s) + 1
    if (out - 1) * s >= size + pad:  # the last window must start inside the input or left pad
        out -= 1
    return max((out - 1) * s + d * (k - 1) + 1 - (size + 2 * pad), 0)


def _pool(step: PoolStep, h: Any, p: Mapping[str, Any], mask: Any) -> Any:
    from jax import lax

    _, jnp = require_jax()
    H, W = h.shape[-2:]
    (kh, kw), (sh, sw) = step.kernel_size, step.stride
    (ph, pw), (dh, dw) = step.padding, step.dilation
    eh = _pool_extra(H, kh, sh, ph, dh, step.ceil_mode)
    ew = _pool_extra(W, kw, sw, pw, dw, step.ceil_mode)
    pads = ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew))
    window, strides = (1, 1, kh, kw), (1, 1, sh, sw)
    if step.op == "max":
        return lax.reduce_window(
            h, -jnp.inf, lax.max, window, strides, pads, window_dilation=(1, 1, dh, dw)
        )
    total = lax.reduce_window(h, 0.0, lax.add, window, strides, pads)
    if step.divisor_override is not None:
        return total / step.divisor_override
    # torch divides by the window's cells inside the padded input (count_include_pad) or
    # inside the input itself, never counting the extra cells of ceil_mode
    if step.count_include_pad:
        cells = jnp.pad(jnp.ones((H + 2 * ph, W + 2 * pw), h.dtype), ((0, eh), (0, ew)))
    else:
        cells = jnp.pad(jnp.ones((H, W), h.dtype), ((ph, ph + eh), (pw, pw + ew)))
    count = lax.reduce_window(cells, 0.0, lax.add, (kh, kw), (sh, sw), "VALID")
    return total / count


def _flatten(step: FlattenStep, h: Any, p: Mapping[str, Any], mask: Any) -> Any:
    return h.reshape(h.shape[0], -1)


@functools.cache
def _jax_activations() -> dict[str, Callable[..., Any]]:
    """The JAX form of every :data:`~hierbayes.models.network_plan.ACTIVATIONS` name (torch's
    formulas and constants, keyword arguments as in ``torch.nn.functional``)."""
    import jax

    _, jnp = require_jax()

    def elu(h: Any, alpha: float) -> Any:
        return jnp.where(h > 0, h, alpha * jnp.expm1(jnp.minimum(h, 0)))

    def softplus(h: Any, beta: float, threshold: float) -> Any:
        return jnp.where(h * beta > threshold, h, jnp.logaddexp(0.0, h * beta) / beta)

    return {
        "relu": lambda h: jnp.maximum(h, 0),
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "silu": lambda h: h * jax.nn.sigmoid(h),
        "identity": lambda h: h,
        "elu": elu,
        "leaky_relu": lambda h, negative_slope: jnp.where(h > 0, h, negative_slope * h),
        "softplus": softplus,
        "gelu": lambda h: jax.nn.gelu(h, approximate=False),
        "gelu_tanh": lambda h: jax.nn.gelu(h, approximate=True),
    }


def _activation(step: ActivationStep, h: Any, p: Mapping[str, Any], mask: Any) -> Any:
    return _jax_activations()[step.name](h, **step.kwargs)


_JAX_STEPS: dict[str, Callable[[Any, Any, Mapping[str, Any], Any], Any]] = {
    LinearStep.kind: _linear,
    Conv2dStep.kind: _conv2d,
    BatchNormStep.kind: _batch_norm,
    PoolStep.kind: _pool,
    FlattenStep.kind: _flatten,
    ActivationStep.kind: _activation,
}


def _plan_of(model: TaskModel) -> tuple[PlanStep, ...]:
    plan = model.net.plan
    if plan is None:
        raise NotImplementedError(
            "the JAX density needs a network on BatchedNetwork's fast path (a (nested) "
            "nn.Sequential of Linear, Conv2d, pooling, Flatten, batch norm and element-wise "
            f"activations); {type(model.net.module).__name__} runs through torch.func.vmap and "
            "has no JAX translation. Use hierbayes.inference.references.nuts_pyro, which runs any hierbayes "
            "model."
        )
    return plan


def jax_network(model: TaskModel) -> Callable[..., Any]:
    r"""The model's network as a pure JAX function ``f(phi, x, mask=None)`` of one task.

    ``phi`` is ``(D,)`` in the layout of ``model.net.layout`` (any entries after the network's
    are ignored), ``x`` ``(N, *input_shape)`` and ``mask`` an optional ``(N,)`` boolean array of
    real points (only batch norm reads it); the result is ``(N, *output_shape)``, equal to
    ``model.net(phi[None], x[None])[0]``.

    Raises
    ------
    NotImplementedError
        When the network has no fast-path plan.
    """
    require_jax()
    plan = _plan_of(model)
    layout: ParameterLayout = model.net.layout
    slices = {
        name: (layout.slice(name), shape)
        for name, shape in zip(layout.names, layout.shapes, strict=True)
    }

    def network(phi: Any, x: Any, mask: Any | None = None) -> Any:
        p = {name: phi[sl].reshape(shape) for name, (sl, shape) in slices.items()}
        h = x
        for step in plan:
            h = _JAX_STEPS[step.kind](step, h, p, mask)
        return h

    return network


# -- the likelihood -----------------------------------------------------------------------------
