r"""A :class:`~hierbayes.models.TaskModel`'s per-task log density as a pure JAX function.

For one task with support data :math:`(x, y)` (``N`` points) and the global values
:math:`\hat\theta`, the noise scale and the prior scale :math:`s`, the function returned by
:func:`jax_log_density` is

.. math::

    \log p(y, \phi \mid x, \hat\theta)
      = \sum_{n=1}^{N} m_n \log p(y_n \mid f(x_n; \phi))
        + \sum_{d=1}^{D} \log \mathcal N(\phi_d;\, \hat\theta_d, s^2),

the same quantity as ``TaskModelDensity.log_likelihood + TaskModelDensity.log_prior`` for one
task (``m`` is the optional mask of real points). With a per-task Gaussian noise scale
(``GaussianLikelihood(per_task=True)``), :math:`\log\sigma_j` is the last entry of
:math:`\phi_j` with its own prior scale, as in the torch model. NumPyro's NUTS samples
:math:`p(\phi \mid x, y, \hat\theta)` with it (:func:`hierbayes.inference.reference.nuts.nuts_numpyro`);
the tests check it against the torch density in float64 to 1e-10 on random inputs.

The network is rebuilt layer by layer from the module (a ``nn.Linear`` or an ``nn.Sequential``,
possibly nested, of ``Linear``, ``Flatten`` and element-wise activations), reading each
parameter's slice of :math:`\phi` from the model's
:class:`~hierbayes.models.network.ParameterLayout` (row-major, ``named_parameters`` order).
Convolutions, pooling and batch norm are not translated: use
:func:`~hierbayes.inference.reference.nuts.nuts_pyro`, which runs any hierbayes model.

JAX is optional: it is imported when a function here is called, never at package import.

References
----------
1. Grant, Finn, Levine, Darrell & Griffiths (2018). Recasting gradient-based meta-learning as
   hierarchical bayes. ICLR.
2. Phan, Pradhan & Jankowiak (2019). Composable effects for flexible and accelerated
   probabilistic programming in NumPyro. arXiv:1912.11554.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hierbayes.models.likelihoods import CategoricalLikelihood, GaussianLikelihood
from hierbayes.models.network import ParameterLayout
from hierbayes.models.task_model import TaskModel

__all__ = ["JAX_INSTALL_HINT", "jax_log_density", "jax_network", "jax_params", "require_jax"]

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


@dataclass(frozen=True)
class _JaxStep:
    """One layer: ``kind`` ``linear`` (with slices into phi), ``activation`` or ``flatten``."""

    path: str
    kind: str
    weight: slice | None = None
    weight_shape: tuple[int, ...] = ()
    bias: slice | None = None
    activation: Callable[[Any], Any] | None = None


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    if not isinstance(module, nn.Sequential):
        yield prefix.rstrip("."), module
        return
    for name, child in module.named_children():
        yield from _leaves(child, f"{prefix}{name}.")


def _activation(module: nn.Module, jnp: ModuleType) -> Callable[[Any], Any] | None:
    """The JAX form of a torch element-wise activation (same formula, same constants)."""
    import jax

    if isinstance(module, nn.ReLU):
        return lambda h: jnp.maximum(h, 0)
    if isinstance(module, nn.Tanh):
        return jnp.tanh
    if isinstance(module, nn.Sigmoid):
        return jax.nn.sigmoid
    if isinstance(module, nn.Identity):
        return lambda h: h
    if isinstance(module, nn.SiLU):
        return lambda h: h * jax.nn.sigmoid(h)
    if isinstance(module, nn.ELU):
        alpha = float(module.alpha)
        return lambda h: jnp.where(h > 0, h, alpha * jnp.expm1(jnp.minimum(h, 0)))
    if isinstance(module, nn.LeakyReLU):
        slope = float(module.negative_slope)
        return lambda h: jnp.where(h > 0, h, slope * h)
    if isinstance(module, nn.GELU):
        approximate = module.approximate == "tanh"
        return lambda h: jax.nn.gelu(h, approximate=approximate)
    if isinstance(module, nn.Softplus):
        beta, threshold = float(module.beta), float(module.threshold)
        return lambda h: jnp.where(h * beta > threshold, h, jnp.logaddexp(0.0, h * beta) / beta)
    return None


def _steps(module: nn.Module, layout: ParameterLayout, jnp: ModuleType) -> list[_JaxStep]:
    steps: list[_JaxStep] = []
    for path, leaf in _leaves(module):
        prefix = f"{path}." if path else ""
        if isinstance(leaf, nn.Linear):
            bias = layout.slice(f"{prefix}bias") if leaf.bias is not None else None
            steps.append(
                _JaxStep(
                    path,
                    "linear",
                    layout.slice(f"{prefix}weight"),
                    tuple(leaf.weight.shape),
                    bias,
                )
            )
        elif isinstance(leaf, nn.Flatten) and leaf.start_dim == 1 and leaf.end_dim == -1:
            steps.append(_JaxStep(path, "flatten"))
        else:
            fn = _activation(leaf, jnp)
            if fn is None:
                raise NotImplementedError(
                    f"layer {path or '<root>'!r} ({type(leaf).__name__}) has no JAX translation: "
                    "jax_log_density handles nn.Linear, nn.Flatten and element-wise activations "
                    "(ReLU, Tanh, Sigmoid, ELU, GELU, SiLU, Softplus, LeakyReLU, Identity) in a "
                    "(nested) nn.Sequential. Use hierbayes.inference.nuts_pyro, which runs any "
                    "hierbayes model."
                )
            steps.append(_JaxStep(path, "activation", activation=fn))
    return steps


def jax_network(model: TaskModel) -> Callable[[Any, Any], Any]:
    r"""The model's network as a pure JAX function ``f(phi, x)`` of one task.

    ``phi`` is ``(D,)`` in the layout of ``model.net.layout`` and ``x`` ``(N, *input_shape)``;
    the result is ``(N, *output_shape)``, equal to ``model.net(phi[None], x[None])[0]``.
    """
    _, jnp = require_jax()
    steps = _steps(model.net.module, model.net.layout, jnp)

    def network(phi: Any, x: Any) -> Any:
        h = x
        for step in steps:
            if step.kind == "linear":
                w = phi[step.weight].reshape(step.weight_shape)
                h = h @ w.T
                if step.bias is not None:
                    h = h + phi[step.bias]
            elif step.kind == "flatten":
                h = h.reshape(h.shape[0], -1)
            else:
                assert step.activation is not None
                h = step.activation(h)
        return h

    return network


def jax_log_density(model: TaskModel) -> JaxLogDensity:
    r"""A pure JAX function ``log_density(phi, x, y, params, mask=None)`` of one task.

    Parameters
    ----------
    model:
        A :class:`~hierbayes.models.TaskModel` whose network is a ``nn.Linear`` or a (nested)
        ``nn.Sequential`` of ``Linear``, ``Flatten`` and element-wise activations, with a
        :class:`~hierbayes.models.GaussianLikelihood` or
        :class:`~hierbayes.models.CategoricalLikelihood`.

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
        For a layer or likelihood without a JAX translation.
    """
    _, jnp = require_jax()
    network = jax_network(model)
    likelihood = model.likelihood
    D_net = model.net.num_params
    k = model.num_params - D_net  # the likelihood's per-task parameters after the network's
    if isinstance(likelihood, GaussianLikelihood):
        per_task = bool(getattr(likelihood, "per_task", False))
        learned_noise, fixed_noise = likelihood.learned, likelihood.noise_scale
        if k != (1 if per_task else 0):
            raise NotImplementedError(
                f"{likelihood!r} with {k} per-task likelihood parameters has no JAX translation"
            )

        def log_likelihood(f: Any, y: Any, params: Mapping[str, Any], extra: Any) -> Any:
            if per_task:  # log sigma_j is the last entry of phi_j
                log_sigma = extra[0]
                sigma = jnp.exp(log_sigma)
            else:
                sigma = params["noise_scale"] if learned_noise else fixed_noise
                log_sigma = jnp.log(sigma)
            z = (y - f) / sigma
            per_value = -0.5 * z**2 - log_sigma - _HALF_LOG_2PI
            return per_value.reshape(f.shape[0], -1).sum(-1)

    elif isinstance(likelihood, CategoricalLikelihood) and k == 0:

        def log_likelihood(f: Any, y: Any, params: Mapping[str, Any], extra: Any) -> Any:
            import jax

            log_p = jax.nn.log_softmax(f, axis=-1)
            return jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=-1)[:, 0]

    else:
        raise NotImplementedError(
            f"{likelihood!r} has no JAX translation; jax_log_density handles "
            "GaussianLikelihood (fixed, learned or per-task noise) and CategoricalLikelihood. "
            "Use hierbayes.inference.nuts_pyro."
        )
    learned_prior_scale, fixed_prior_scale = model.learn_prior_scale, model.prior_scale_init
    extra_scale = float(getattr(likelihood, "task_param_prior_scale", 1.0))

    def log_density(
        phi: Any, x: Any, y: Any, params: Mapping[str, Any], mask: Any | None = None
    ) -> Any:
        lp = log_likelihood(network(phi[:D_net], x), y, params, phi[D_net:])
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
