r"""A :class:`~hierbayes.models.TaskModel`'s per-task log density as a pure JAX function.

For one task with support data :math:`(x, y)` (``N`` points) and the global values
:math:`\hat\theta`, the noise scale and the prior scale :math:`s`, the function returned by
:func:`jax_log_density` is

.. math::

    \log p(y, \phi \mid x, \hat\theta)
      = \sum_{n=1}^{N} m_n \log p(y_n \mid f(x_n; \phi))
        + \sum_{d=1}^{D} \log \mathcal N(\phi_d;\, \hat\theta_d, s_d^2),

the same quantity as ``TaskModelDensity.log_likelihood + TaskModelDensity.log_prior`` for one
task (``m`` is the optional mask of real points). With a per-task Gaussian noise scale
(``GaussianLikelihood(per_task=True)``), :math:`\log\sigma_j` is the last entry of
:math:`\phi_j` with its own prior scale, as in the torch model. NumPyro's NUTS samples
:math:`p(\phi \mid x, y, \hat\theta)` with it (:func:`hierbayes.inference.references.nuts.nuts_numpyro`);
the tests check it against the torch density in float64 to 1e-10 on random inputs.

Nothing here reads the ``nn.Module``. The network is the model's fast-path plan
(:attr:`~hierbayes.models.network.BatchedNetwork.plan`, the description the torch fast path runs),
interpreted step by step with one table from step kind to a ``jax.numpy`` implementation
(:data:`_JAX_STEPS`); every parameter is read by name from :math:`\phi` through the model's
:class:`~hierbayes.models.network.ParameterLayout`. The likelihood is read through its declared
:class:`~hierbayes.models.likelihoods.LikelihoodSpec`. A network off the fast path (a module that runs through
``torch.func.vmap``) has no plan, hence no JAX form: use
:func:`~hierbayes.inference.references.nuts.nuts_pyro`, which runs any hierbayes model.

Batch norm uses the statistics of the task's real points: with a ``mask``, padded points are
left out of the means and variances (the torch density refuses padded batch-norm tasks
instead), so the result is the density of the task on its own.

JAX is optional: it is imported when a function here is called, never at package import.

References
----------
1. Grant, Finn, Levine, Darrell & Griffiths (2018). Recasting gradient-based meta-learning as
   hierarchical bayes. ICLR.
2. Phan, Pradhan & Jankowiak (2019). Composable effects for flexible and accelerated
   probabilistic programming in NumPyro. arXiv:1912.11554.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.models.likelihoods import Likelihood, LikelihoodSpec
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

__all__ = [
    "JAX_INSTALL_HINT",
    "jax_log_density",
    "jax_network",
    "jax_params",
    "likelihood_spec",
    "require_jax",
]

#: What the ImportError says when JAX or NumPyro is missing.
JAX_INSTALL_HINT = (
    'this needs JAX and NumPyro, which hierbayes leaves optional: pip install "hierbayes[jax]"'
)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: A single-task function of JAX arrays ``(phi, x, y, params, mask=None) -> scalar``.
JaxLogDensity = Callable[..., Any]


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


def likelihood_spec(likelihood: Likelihood) -> LikelihoodSpec:
    """The likelihood's declared :class:`~hierbayes.models.likelihoods.LikelihoodSpec`.

    Raises
    ------
    NotImplementedError
        For a likelihood that declares none.
    """
    spec = likelihood.spec
    if spec is None:
        raise NotImplementedError(
            f"{likelihood!r} declares no LikelihoodSpec, so it has no JAX translation (the "
            "built-in GaussianLikelihood and CategoricalLikelihood do). Use "
            "hierbayes.inference.references.nuts_pyro, which runs any hierbayes model."
        )
    return spec


def _gaussian(spec: LikelihoodSpec, f: Any, y: Any, params: Mapping[str, Any], extra: Any) -> Any:
    _, jnp = require_jax()
    if spec.noise == "per_task":
        log_sigma = extra[0]
        sigma = jnp.exp(log_sigma)
    else:
        sigma = params["noise_scale"] if spec.noise == "learned" else spec.noise_scale
        log_sigma = jnp.log(sigma)
    z = (y - f) / sigma
    return (-0.5 * z**2 - log_sigma - _HALF_LOG_2PI).reshape(f.shape[0], -1).sum(-1)


def _categorical(
    spec: LikelihoodSpec, f: Any, y: Any, params: Mapping[str, Any], extra: Any
) -> Any:
    import jax

    _, jnp = require_jax()
    log_p = jax.nn.log_softmax(f, axis=-1)
    return jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


#: ``(spec, f (N, ...), y, params, the task's likelihood parameters) -> (N,)`` by ``kind``.
_JAX_LIKELIHOODS: dict[str, Callable[[LikelihoodSpec, Any, Any, Mapping[str, Any], Any], Any]] = {
    "gaussian": _gaussian,
    "categorical": _categorical,
}


def jax_log_density(model: TaskModel) -> JaxLogDensity:
    r"""A pure JAX function ``log_density(phi, x, y, params, mask=None)`` of one task.

    Parameters
    ----------
    model:
        A :class:`~hierbayes.models.TaskModel` whose network has a fast-path plan
        (:attr:`~hierbayes.models.network.BatchedNetwork.plan`) and whose likelihood has a
        :class:`~hierbayes.models.likelihoods.LikelihoodSpec` (:class:`~hierbayes.models.GaussianLikelihood` with fixed,
        learned or per-task noise, :class:`~hierbayes.models.CategoricalLikelihood`).

    Returns
    -------
    log_density:
        ``phi`` ``(D,)``, ``x`` ``(N, *input_shape)``, ``y`` ``(N, *target_shape)`` (integer
        ``(N,)`` labels for a categorical likelihood), ``params`` a dict of JAX arrays from
        :func:`jax_params`, ``mask`` an optional ``(N,)`` boolean array; returns the scalar
        :math:`\log p(y\mid\phi, x) + \log p(\phi\mid\hat\theta)` of the module docstring.
        It is pure, so ``jax.grad``, ``jax.jit`` and ``jax.vmap`` apply.

    Raises
    ------
    NotImplementedError
        For a network without a plan or a likelihood without a spec.
    """
    _, jnp = require_jax()
    network = jax_network(model)
    likelihood = model.likelihood
    spec = likelihood_spec(likelihood)
    log_likelihood = _JAX_LIKELIHOODS[spec.kind]
    D_net = model.net.num_params
    k = model.num_params - D_net  # the likelihood's per-task parameters after the network's
    expected = 1 if spec.noise == "per_task" else 0
    if k != expected or likelihood.num_task_params != expected:
        raise NotImplementedError(
            f"{likelihood!r} with {k} per-task parameters in phi has no JAX translation; its "
            f"description {spec} expects {expected}"
        )
    learned_prior_scale, fixed_prior_scale = model.learn_prior_scale, model.prior_scale_init
    extra_scale = likelihood.task_param_prior_scale

    def log_density(
        phi: Any, x: Any, y: Any, params: Mapping[str, Any], mask: Any | None = None
    ) -> Any:
        f = network(phi[:D_net], x, mask)
        lp = log_likelihood(spec, f, y, params, phi[D_net:])
        if mask is not None:
            lp = jnp.where(mask, lp, 0.0)
        scale = params["prior_scale"] if learned_prior_scale else fixed_prior_scale
        if k:  # the per-task likelihood parameters keep their own prior scale
            scale = jnp.concatenate(
                [jnp.full((D_net,), scale, dtype=phi.dtype), jnp.full((k,), extra_scale, phi.dtype)]
            )
        z = (phi - params["theta"]) / scale
        log_prior = (-0.5 * z**2 - jnp.log(scale) - _HALF_LOG_2PI).sum()
        return lp.sum() + log_prior

    return log_density


def jax_params(
    model: TaskModel, params: Mapping[str, Tensor], *, dtype: Any = None
) -> dict[str, Any]:
    r"""The global values as JAX arrays, with ``theta`` always present.

    ``theta`` is ``model.theta_of(params)`` (a ``pyro.param`` of the model when it has no
    hyperprior); the likelihood's and prior's own globals (``noise_scale``, ``prior_scale``)
    are copied when present. ``dtype`` defaults to each tensor's own (float32 unless JAX's
    ``jax_enable_x64`` is on).
    """
    _, jnp = require_jax()
    values: dict[str, Tensor] = {k: v for k, v in params.items() if isinstance(v, Tensor)}
    values["theta"] = model.theta_of(params)
    if model.learn_prior_scale:  # a latent site, or the model's own pyro.param
        scale = torch.as_tensor(model.prior_scale_of(params))
        values["prior_scale"] = scale if scale.dim() == 0 else scale[0]
    out: dict[str, Any] = {}
    for name, value in values.items():
        array = np.asarray(value.detach().cpu().numpy())
        if dtype is not None:
            array = array.astype(dtype)
        out[name] = jnp.asarray(array)
    return out


def to_numpy(value: Tensor, dtype: Any = None) -> np.ndarray:
    """A detached CPU copy of ``value`` as NumPy, optionally cast (floating tensors only)."""
    array = value.detach().cpu().numpy()
    if dtype is not None and torch.is_floating_point(value):
        array = array.astype(dtype)
    return np.asarray(array)
