r"""Any ``torch.nn.Module`` as a hierbayes model: a Pyro program with a native fast path.

The generative model (Grant et al. 2018, §2.2) for a batch of ``T`` tasks:

.. math::

    \theta &\sim \mathcal N(\theta_0, s_\theta^2 I)          &&\text{(global, type-II MAP)}\\
    \phi_j \mid \theta &\sim \mathcal N(\theta, s^2 I)        &&\text{(per task, in plate "tasks")}\\
    y_{jn} \mid \phi_j &\sim p(y \mid f(x_{jn}; \phi_j))      &&\text{(in plate "data")}

where :math:`\phi_j \in \mathbb R^D` is the flat parameter vector of the network and
:math:`\theta_0` the network's own initialisation. The likelihood may add global latents of its
own (a Gaussian noise scale); the prior scale :math:`s` may be fixed or learned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import Tensor, nn

from hierbayes.errors import TaskDataError
from hierbayes.models.likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood
from hierbayes.models.network import BatchedNetwork, LayerRecord
from hierbayes.models.structure import ModelStructure

__all__ = ["TaskModel", "TaskModelDensity", "from_module"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class TaskModel(PyroModule):
    r"""A hierarchical model over tasks whose per-task parameters are a network's weights.

    Calling it is running a Pyro program ``model(x, y=None, mask=None)`` with sites
    ``theta`` (or a ``pyro.param`` when ``hyperprior_scale is None``), the likelihood's own
    globals (``noise_scale`` for a learned Gaussian noise), ``prior_scale`` when learned,
    ``phi`` in ``pyro.plate("tasks", T, dim=-2)`` with value shape ``(T, 1, D)``, and ``y`` in
    ``pyro.plate("data", N, dim=-1)``.

    Parameters
    ----------
    network:
        Maps ``(N, *input_shape)`` to ``(N, *output_shape)``; never modified.
    likelihood:
        The observation model, e.g. :class:`GaussianLikelihood` or
        :class:`CategoricalLikelihood`.
    prior_scale:
        :math:`s` in :math:`\phi_j \sim \mathcal N(\theta, s^2 I)`, or its initial value when
        ``learn_prior_scale``.
    learn_prior_scale:
        Learn :math:`s`: a global latent ``prior_scale`` with hyperprior
        :math:`\log s \sim \mathcal N(\log s_0, \omega^2)`, or a ``pyro.param`` with no
        hyperprior when ``prior_scale_hyperprior is None``.
    prior_scale_hyperprior:
        :math:`\omega`, the hyperprior's scale on :math:`\log s` (default 1); ``None`` learns
        :math:`s` by plain empirical Bayes (the configuration of the issue-14 prototype, which
        learned :math:`\log\tau = -2\log s` with no hyperprior).
    hyperprior_scale:
        :math:`s_\theta`; ``None`` makes :math:`\theta` a ``pyro.param`` (plain empirical Bayes).
    theta_init:
        :math:`\theta_0`, ``(D,)``; the network's own initialisation by default.
    name:
        The prefix of its ``pyro.param`` sites (``f"{name}.theta"``): the class name by
        default, however many models a process builds. As for any ``PyroModule``, models of
        one name share values under Pyro's handlers: name two apart to train both side by
        side through ``pyro.infer.SVI`` (their guides follow). hierbayes' own runs always use
        the model's own values (:mod:`hierbayes.models.param_store`).

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
    >>> model = TaskModel(net, GaussianLikelihood())
    """

    def __init__(
        self,
        network: nn.Module,
        likelihood: Likelihood,
        *,
        prior_scale: float = 1.0,
        learn_prior_scale: bool = False,
        hyperprior_scale: float | None = 10.0,
        theta_init: Tensor | None = None,
        prior_scale_hyperprior: float | None = 1.0,
        name: str | None = None,
    ) -> None:
        chosen = type(self).__name__ if name is None else name
        if not isinstance(chosen, str) or not chosen or "$" in chosen:
            raise ValueError(f"name must be a non-empty string without '$'; got {name!r}")
        super().__init__(name=chosen)
        #: The model's name in Pyro's parameter store (the prefix of its ``pyro.param`` sites).
        self.name = chosen
        #: Whether the name was chosen (``name=``) rather than the class name.
        self.named = name is not None
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive; got {prior_scale}")
        self.net = BatchedNetwork(network)
        self.likelihood = likelihood
        self.prior_scale_init = float(prior_scale)
        self.learn_prior_scale = learn_prior_scale
        self.hyperprior_scale = hyperprior_scale
        if prior_scale_hyperprior is not None and not prior_scale_hyperprior > 0:
            raise ValueError(
                f"prior_scale_hyperprior must be positive or None; got {prior_scale_hyperprior}"
            )
        self.prior_scale_hyperprior = prior_scale_hyperprior
        self.num_network_params = self.net.num_params
        self.num_task_likelihood_params = likelihood.num_task_params
        D = self.num_network_params + self.num_task_likelihood_params
        if theta_init is None:
            init = torch.cat(
                [
                    self.net.initial_parameters(),
                    likelihood.task_param_init().to(torch.get_default_dtype()),
                ]
            )
        else:
            init = theta_init.detach().clone()
        if init.shape != (D,):
            raise ValueError(f"theta_init must have shape ({D},); got {tuple(init.shape)}")
        self.register_buffer("theta_init", init)
        #: How to construct this model again (``{"class": ..., "kwargs": ...}``), set by
        #: built-in models whose arguments are plain values; ``None`` for a network of your
        #: own (``hierbayes.load`` then asks for the model).
        self.constructor: dict[str, Any] | None = None
        if hyperprior_scale is None:
            self.theta = PyroParam(init.clone())
        if learn_prior_scale and prior_scale_hyperprior is None:
            self.prior_scale_param = PyroParam(
                init.new_tensor(float(prior_scale)), constraints.positive
            )

    @property
    def num_params(self) -> int:
        """:math:`D`: the network's parameters plus the likelihood's per-task parameters."""
        return self.num_network_params + self.num_task_likelihood_params

    def split(
        self, params: Mapping[str, Tensor], phi: Tensor
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        r"""The network's part of :math:`\phi` ``(T, D)`` and the global values completed with
        the likelihood's per-task parameters."""
        if self.num_task_likelihood_params == 0:
            return phi, params
        net = phi[:, : self.num_network_params]
        return net, self.likelihood.with_task_params(params, phi[:, self.num_network_params :])

    # -- the Pyro program ----------------------------------------------------------------------

    def sample_globals(self) -> dict[str, Tensor]:
        """Sample (or read) every global latent, returning ``{name: value}``."""
        return {
            name: pyro.sample(name, cast(Any, prior))
            for name, prior in self.global_priors().items()
        }

    def global_priors(self) -> dict[str, dist.Distribution]:
        """Hyperpriors of the global latents, by site name."""
        ref: Tensor = self.theta_init
        priors: dict[str, dist.Distribution] = {}
        if self.hyperprior_scale is not None:
            priors["theta"] = dist.Normal(ref, self.hyperprior_scale).to_event(1)
        for name, prior in self.likelihood.global_priors().items():
            priors[name] = _to_like(prior, ref)
        if self._prior_scale_is_latent:
            priors["prior_scale"] = dist.LogNormal(
                ref.new_tensor(math.log(self.prior_scale_init)),
                ref.new_tensor(float(cast(float, self.prior_scale_hyperprior))),
            )
        return priors

    def forward(self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        params = self.sample_globals()
        theta = self.theta_of(params)
        scale = self.prior_scale_of(params)
        T, N = x.shape[0], x.shape[1]
        with pyro.plate("tasks", T, dim=-2):
            phi = pyro.sample("phi", dist.Normal(theta, scale).to_event(1))
            net, task_params = self.split(params, phi.reshape(T, self.num_params))
            f = self.net(net, x)
            keep = cast(Any, True if mask is None else mask)
            with pyro.plate("data", N, dim=-1), poutine.mask(mask=keep):
                pyro.sample("y", cast(Any, self.likelihood.distribution(f, task_params)), obs=y)
        return f

    # -- pieces shared with the native density -------------------------------------------------

    def theta_of(self, params: Mapping[str, Tensor]) -> Tensor:
        r""":math:`\theta` from the global values (or the model's own ``pyro.param``)."""
        if self.hyperprior_scale is None:
            return cast(Tensor, self.theta)
        return params["theta"]

    def prior_scale_of(self, params: Mapping[str, Tensor]) -> Tensor | float:
        """:math:`s` of :math:`p(\\phi\\mid\\theta)`: learned or fixed; a ``(D,)`` vector when the
        likelihood has per-task parameters (they keep their own scale)."""
        scale: Tensor | float
        if self._prior_scale_is_latent:
            scale = params["prior_scale"]
        elif self.learn_prior_scale:
            scale = cast(Tensor, self.prior_scale_param)
        else:
            scale = self.prior_scale_init
        k = self.num_task_likelihood_params
        if k == 0:
            return scale
        ref: Tensor = self.theta_init
        net = ref.new_ones(self.num_network_params) * scale
        return torch.cat([net, ref.new_full((k,), self.likelihood.task_param_prior_scale)])

    def initial_values(self) -> dict[str, Tensor]:
        """Where the guide starts each global latent: :math:`\\theta_0` and the likelihood's."""
        ref: Tensor = self.theta_init
        values = {k: v.to(ref) for k, v in self.likelihood.initial_values().items()}
        if self.hyperprior_scale is not None:
            values["theta"] = ref.clone()
        if self._prior_scale_is_latent:
            values["prior_scale"] = ref.new_tensor(self.prior_scale_init)
        return values

    @property
    def _prior_scale_is_latent(self) -> bool:
        """Whether :math:`s` is a global sample site (learned, with a hyperprior)."""
        return self.learn_prior_scale and self.prior_scale_hyperprior is not None

    def _apply(self, fn: Any, recurse: bool = True) -> TaskModel:
        # .to() / .double() / .cuda() also reach the wrapped network's buffers (batch-norm
        # statistics and the like), which BatchedNetwork holds outside the module tree
        super()._apply(fn, recurse)
        self.net.module._apply(fn, recurse)
        self.net._buffers = dict(self.net.module.named_buffers())
        return self

    def task_density(self, structure: ModelStructure) -> TaskModelDensity:
        """The native :class:`~hierbayes.models.density.TaskDensity` of this model."""
        return TaskModelDensity(self, structure)


def _to_like(prior: dist.Distribution, ref: Tensor) -> dist.Distribution:
    """Move a scalar-parameter LogNormal/Normal hyperprior to ``ref``'s device and dtype."""
    if isinstance(prior, (dist.LogNormal, dist.Normal)):
        return type(prior)(prior.loc.to(ref), prior.scale.to(ref))
    return prior


class TaskModelDensity:
    """Closed-form per-task log densities of a :class:`TaskModel` (no Pyro tracing)."""

    def __init__(self, model: TaskModel, structure: ModelStructure) -> None:
        self.model = model
        self.structure = structure
        self.likelihood = model.likelihood
        self.network = model.net
        self.has_batch_norm = model.net.has_batch_norm

    def outputs(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> Tensor:
        r""":math:`f(x_{jn}; \phi_j)`, ``(T, N, *output_shape)``."""
        return self.network(self.model.split(params, phi)[0], x)

    def outputs_with_records(
        self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor
    ) -> tuple[Tensor, list[LayerRecord]]:
        return self.network.forward_with_records(self.model.split(params, phi)[0], x)

    def output_factor(self, params: Mapping[str, Tensor], phi: Tensor, f: Tensor) -> Tensor:
        r""":math:`L_n` with :math:`\Lambda_n = L_nL_n^\top` at outputs ``f`` ``(T, N, C)``."""
        return self.likelihood.output_factor(f, self.model.split(params, phi)[1])

    def noise_variance(self, params: Mapping[str, Tensor], phi: Tensor, f: Tensor) -> Tensor:
        r"""Observation-noise variance :math:`\sigma^2` (Gaussian likelihoods), shaped like ``f``."""
        return self.likelihood.noise_variance(f, self.model.split(params, phi)[1])

    def diagonal_curvature(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor | None:
        r"""Curvature of :math:`-\log p(y\mid\phi)` in the likelihood's per-task parameters
        (their Fisher information), ``(T, D)`` with zeros elsewhere; ``None`` if there are none."""
        k = self.model.num_task_likelihood_params
        if k == 0:
            return None
        net, task_params = self.model.split(params, phi)
        fisher = self.likelihood.task_param_curvature(self.network(net, x), task_params, mask)
        return torch.cat(
            [fisher.new_zeros(phi.shape[0], self.model.num_network_params), fisher], dim=-1
        )

    def log_likelihood(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        self.check_mask(mask)
        net, task_params = self.model.split(params, phi)
        return self.likelihood.log_prob_sum(self.network(net, x), y, task_params, mask)

    def log_likelihood_of_outputs(
        self,
        params: Mapping[str, Tensor],
        phi: Tensor,
        f: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\log p(y_j\mid\phi_j)` from already computed outputs ``f`` at ``phi``."""
        return self.likelihood.log_prob_sum(f, y, self.model.split(params, phi)[1], mask)

    def check_mask(self, mask: Tensor | None) -> None:
        if mask is None or not self.has_batch_norm or bool(mask.all()):
            return
        raise TaskDataError(
            "this network normalises each task's batch of points (batch norm), so padded points "
            "of tasks with unequal sizes would enter the statistics of the real ones: give every "
            "task the same number of points, or use a network without batch norm"
        )

    def log_prior(
        self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor | None = None
    ) -> Tensor:
        theta = self.model.theta_of(params)
        scale = self.model.prior_scale_of(params)
        z = (phi - theta) / scale
        if isinstance(scale, Tensor) and scale.dim() > 0:
            return (-0.5 * z.square()).sum(-1) - scale.log().sum() - phi.shape[-1] * _HALF_LOG_2PI
        log_scale = torch.log(scale) if isinstance(scale, Tensor) else math.log(scale)
        return (-0.5 * z.square()).sum(-1) - phi.shape[-1] * (log_scale + _HALF_LOG_2PI)

    def prior_precision(self, params: Mapping[str, Tensor]) -> Tensor:
        r"""The diagonal of :math:`-\nabla^2_\phi \log p(\phi\mid\theta)`: :math:`1/s^2`, ``(D,)``."""
        scale = self.model.prior_scale_of(params)
        ref = self.model.theta_of(params)
        if isinstance(scale, Tensor) and scale.dim() > 0:
            return 1.0 / scale.square()
        # an expanded scalar: structured code sees a constant row and skips per-entry work
        return (1.0 / (ref.new_ones(()) * scale) ** 2).expand(ref.shape[-1])

    def prior_mean(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return self.model.theta_of(params).expand(x.shape[0], self.model.num_params)

    def log_hyperprior(self, params: Mapping[str, Tensor], x: Tensor | None = None) -> Tensor:
        total: Tensor | float = 0.0
        for name, prior in self.model.global_priors().items():
            total = total + prior.log_prob(params[name]).sum()
        if isinstance(total, float):
            return self.model.theta_init.new_tensor(total)
        return total

    def predictive(self, params: Mapping[str, Tensor], phi: Tensor, x: Tensor) -> dist.Distribution:
        net, task_params = self.model.split(params, phi)
        return self.likelihood.distribution(self.network(net, x), task_params)


def from_module(
    module: nn.Module, likelihood: str | Likelihood = "gaussian", **kwargs: Any
) -> TaskModel:
    """A :class:`TaskModel` from any module: ``likelihood`` ``"gaussian"``, ``"categorical"``
    or a :class:`Likelihood`; other keywords go to :class:`TaskModel`."""
    if isinstance(likelihood, str):
        known: dict[str, type[Likelihood]] = {
            "gaussian": GaussianLikelihood,
            "categorical": CategoricalLikelihood,
        }
        if likelihood not in known:
            raise ValueError(f"unknown likelihood {likelihood!r}; known: {sorted(known)}")
        return TaskModel(module, known[likelihood](), **kwargs)
    return TaskModel(module, likelihood, **kwargs)
