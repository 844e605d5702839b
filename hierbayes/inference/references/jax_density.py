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

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hierbayes.inference.references.jax_network import jax_network, require_jax
from hierbayes.models.likelihoods import Likelihood, LikelihoodSpec
from hierbayes.models.task_model import TaskModel

__all__ = ["jax_log_density", "jax_params", "likelihood_spec", "to_numpy"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: A single-task function of JAX arrays ``(phi, x, y, params, mask=None) -> scalar``.
JaxLogDensity = Callable[..., Any]


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
