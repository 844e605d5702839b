r"""The truncated-gradient guide: MAML's inner loop as an amortised point posterior in Pyro.

Grant et al. (2018, §3.1) read MAML as empirical Bayes in which each task's posterior is
replaced by a point estimate computed by :math:`k` gradient steps from :math:`\theta` on the
task's support data. :class:`TruncatedGradientGuide` is that map
:math:`(\theta, \mathcal D^s_j) \mapsto \hat\phi_j` written as a Pyro guide:

* every global latent of the model (:math:`\theta`, a noise scale, ...) gets a learnable point
  estimate (a ``Delta`` site, as in ``AutoDelta``: type-II MAP);
* the per-task latent gets ``Delta(φ̂_j)`` inside the model's own ``tasks`` plate, with

.. math::

    \hat\phi_j = \phi_{(k)},\quad \phi_{(0)} = \mathbb E[\phi\mid\theta],\quad
    \phi_{(i)} = \phi_{(i-1)} + \alpha\odot\nabla_\phi \log p(y^s_j \mid \phi, x^s_j)
    \;[+ \log p(\phi\mid\theta)].

Learned step sizes :math:`\alpha` (one scalar, or one per parameter as in Meta-SGD, Li et al.
2017) are a learned diagonal preconditioner, i.e. a learned prior covariance (MATH.md §3).

References
----------
1. Finn, Abbeel & Levine (2017). Model-agnostic meta-learning for fast adaptation of deep
   networks. ICML.
2. Grant, Finn, Levine, Darrell & Griffiths (2018). Recasting gradient-based meta-learning as
   hierarchical Bayes. ICLR.
3. Li, Zhou, Chen & Li (2017). Meta-SGD: learning to learn quickly for few-shot learning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, cast, runtime_checkable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import transform_to

from hierbayes.errors import TaskDataError
from hierbayes.inference.core.inner_loop import InnerLoss, adapt_tasks, effective_step_size
from hierbayes.models.density import TaskDensity, task_density
from hierbayes.models.param_store import guide_name
from hierbayes.models.structure import ModelStructure, model_structure
from hierbayes.tasks.batch import TaskBatch

__all__ = ["TruncatedGradientGuide"]

StepSizeMode = Literal["fixed", "scalar", "per_parameter"]
InnerObjective = Literal["likelihood", "joint"]


@runtime_checkable
class InitialValuesModel(Protocol):
    """A model that says where the guide should start its global latents."""

    def initial_values(self) -> Mapping[str, Tensor]: ...


def _to_support(support: constraints.Constraint) -> Callable[[Tensor], Tensor]:
    """``transform_to(support)`` as a plain function, with the two common cases written out
    (the same numbers: identity for real values, ``exp`` for :math:`(0, \\infty)`)."""
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    if base is constraints.real:
        return _identity
    if isinstance(base, constraints.greater_than) and float(base.lower_bound) == 0.0:
        return torch.exp
    transform: Callable[[Tensor], Tensor] = transform_to(support)
    return transform


def _identity(value: Tensor) -> Tensor:
    return value


def _deep_getattr(obj: Any, dotted: str) -> Tensor:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    value: Tensor = obj
    return value


class TruncatedGradientGuide(PyroModule):
    r"""Amortised point posterior of every task by ``inner_steps`` gradient steps from :math:`\theta`.

    Call it with the model's signature on **support** data, ``guide(x, y, mask=None)``; it
    emits point masses at the model's global sites and at its per-task site (inside
    ``pyro.plate("tasks")``) and returns ``{site: value}``. It works under ``poutine.trace`` and
    ``poutine.replay`` like any guide; :class:`~hierbayes.inference.MAMLObjective` replays the
    model on the query data against it.

    Parameters
    ----------
    model:
        A hierbayes model (see :mod:`hierbayes.models.structure`).
    example:
        A :class:`~hierbayes.tasks.TaskBatch` or ``(x, y)`` of support data: the guide traces
        the model on it once, here, to find its sites and create every parameter eagerly.
    inner_steps:
        :math:`k`.
    step_size:
        :math:`\alpha` (its initial value when learned): a number, or a ``(D,)`` tensor of
        per-parameter step sizes (a diagonal preconditioner; e.g. the learned step sizes of
        another run, ``result.guide.step_size``) with ``"fixed"`` or ``"per_parameter"``. With ``inner_loss="sum"`` it
        multiplies the gradient of the summed support log likelihood; for a Gaussian likelihood
        with noise :math:`\sigma` and ``N`` support points, MAML's step
        :math:`\alpha_{\mathrm{MSE}}` on the mean squared error corresponds to
        :math:`\alpha = 2\sigma^2\alpha_{\mathrm{MSE}}/N` (:meth:`effective_step_size`).
    learn_step_size:
        ``"fixed"`` (MAML), ``"scalar"`` (one learned :math:`\alpha`) or ``"per_parameter"``
        (Meta-SGD's diagonal preconditioner). Learned step sizes stay positive (they are stored
        as logarithms), so the preconditioner stays positive definite.
    first_order:
        First-order MAML: inner gradients are detached.
    inner_objective:
        ``"likelihood"`` steps on :math:`\log p(y^s\mid\phi)` (MAML); ``"joint"`` adds the
        model's :math:`\log p(\phi\mid\theta)`.
    inner_loss:
        ``"sum"`` (the summed log likelihood, default), ``"mean"`` (divided by each task's
        number of support points) or ``"mse"`` (MAML's mean squared error, for network models:
        the step no longer depends on the number of points or on a learned noise scale). See
        :func:`~hierbayes.inference.core.inner_loop.adapt_tasks`.
    gradient_checkpointing:
        Checkpoint each inner step (``torch.utils.checkpoint``): second-order meta-gradients
        then keep one :math:`\phi` per step instead of every step's activations, at about one
        more forward and backward pass a step; the same values and gradients (off by default).
    init_values:
        Initial values of global latents by site name; by default the model's
        ``initial_values()`` where it has one, else each site's prior mean.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        example: TaskBatch | tuple[Tensor, Tensor],
        *,
        inner_steps: int = 1,
        step_size: float | Tensor = 0.01,
        learn_step_size: StepSizeMode = "fixed",
        first_order: bool = False,
        inner_objective: InnerObjective = "likelihood",
        inner_loss: InnerLoss = "sum",
        init_values: Mapping[str, Tensor] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(name=guide_name(model))
        self.gradient_checkpointing = gradient_checkpointing
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0; got {inner_steps}")
        given = torch.as_tensor(step_size).detach()
        if given.numel() == 0 or not bool((given > 0).all()) or not given.isfinite().all():
            raise ValueError(f"step_size must be positive and finite; got {step_size}")
        if learn_step_size not in ("fixed", "scalar", "per_parameter"):
            raise ValueError(
                f"learn_step_size must be 'fixed', 'scalar' or 'per_parameter'; got {learn_step_size!r}"
            )
        if inner_objective not in ("likelihood", "joint"):
            raise ValueError(
                f"inner_objective must be 'likelihood' or 'joint'; got {inner_objective!r}"
            )
        if inner_loss not in ("sum", "mean", "mse"):
            raise ValueError(f"inner_loss must be 'sum', 'mean' or 'mse'; got {inner_loss!r}")
        if inner_loss == "mse" and inner_objective == "joint":
            raise ValueError(
                "inner_loss='mse' is MAML's likelihood-only step; use inner_loss='mean' with "
                "inner_objective='joint'"
            )
        x, y = (example.support_x, example.support_y) if isinstance(example, TaskBatch) else example
        self._model = (model,)  # a tuple, so the model is not registered as a submodule
        self.structure: ModelStructure = model_structure(model, x, y)
        #: The model's per-task densities (native where the model declares one).
        self.density: TaskDensity = task_density(model, self.structure, x)
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.inner_objective: InnerObjective = inner_objective
        self.inner_loss: InnerLoss = inner_loss
        self.learn_step_size: StepSizeMode = learn_step_size

        defaults: dict[str, Tensor] = (
            dict(model.initial_values()) if isinstance(model, InitialValuesModel) else {}
        )
        defaults.update(init_values or {})
        self.locs = PyroModule(name="locs")
        for site in self.structure.global_sites:
            value = defaults.get(site.name, site.prior_mean)
            value = torch.as_tensor(value).to(site.prior_mean).expand(site.shape).clone()
            deep_setattr(self.locs, site.name, PyroParam(value, site.support, site.event_dim))
        #: (site, the module holding its unconstrained parameter, the parameter's name, the
        #: map to the site's support): the fast road's read of each point estimate
        self._readers: list[tuple[str, torch.nn.Module, str, Callable[[Tensor], Tensor]]] = []
        for site in self.structure.global_sites:
            *path, leaf = site.name.split(".")
            owner: torch.nn.Module = self.locs
            for part in path:
                owner = getattr(owner, part)
            self._readers.append(
                (site.name, owner, f"{leaf}_unconstrained", _to_support(site.support))
            )

        D = self.structure.num_params
        ref = x if torch.is_floating_point(x) else torch.zeros((), dtype=torch.get_default_dtype())
        shape: tuple[int, ...] = (D,) if learn_step_size == "per_parameter" else ()
        if given.dim() > 0:
            if learn_step_size == "scalar" or given.shape != (D,):
                raise ValueError(
                    f"step_size of shape {tuple(given.shape)}: a tensor of step sizes must have "
                    f"shape ({D},), one per parameter, with learn_step_size 'fixed' or "
                    f"'per_parameter' (this guide has learn_step_size={learn_step_size!r})"
                )
            shape = (D,)
        init = given.to(dtype=ref.dtype, device=ref.device).expand(shape).clone()
        if learn_step_size == "fixed":
            self.register_buffer("_fixed_step_size", init)
        else:
            self.step_size_param = PyroParam(init, constraints.positive)

    @property
    def model(self) -> Callable[..., Any]:
        """The model this guide was built for."""
        return self._model[0]

    # -- parameters ----------------------------------------------------------------------------

    @property
    def step_size(self) -> Tensor:
        r""":math:`\alpha`: a scalar or ``(D,)``."""
        if self.learn_step_size == "fixed":
            return cast(Tensor, self._fixed_step_size)
        return cast(Tensor, self.step_size_param)

    def global_values(self) -> dict[str, Tensor]:
        """The current point estimates of the global latents, ``{site: value}``: each site's
        unconstrained parameter through its constraint's transform, without Pyro's
        bookkeeping (the fast road's read; differentiable)."""
        return {
            name: transform(getattr(owner, leaf)) for name, owner, leaf, transform in self._readers
        }

    @torch.no_grad()
    def set_global_values(self, values: Mapping[str, Tensor]) -> None:
        """Set the point estimates of the named global latents to ``values`` (in each site's
        support; stored through the inverse of its constraint's transform)."""
        supports = {site.name: site.support for site in self.structure.global_sites}
        unknown = sorted(set(values) - set(supports))
        if unknown:
            raise KeyError(f"no global site {unknown}; the model's globals: {sorted(supports)}")
        for name, owner, leaf, _ in self._readers:
            if name in values:
                param = getattr(owner, leaf)
                free = transform_to(supports[name]).inv(torch.as_tensor(values[name]).to(param))
                param.copy_(free.reshape(param.shape))

    def traced_global_values(self) -> dict[str, Tensor]:
        """The same values read through ``PyroModule`` attributes: inside the guide's call each
        read is a ``pyro.param`` statement that ``SVI``'s parameter capture and a user's
        ``poutine.trace`` see (what :meth:`forward` uses)."""
        return {
            site.name: _deep_getattr(self.locs, site.name) for site in self.structure.global_sites
        }

    # -- the inner loop --------------------------------------------------------------------------

    def adapt(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        *,
        inner_steps: int | None = None,
        step_size: Tensor | float | None = None,
    ) -> Tensor:
        r""":math:`\hat\phi`, ``(T, D)``, for support data ``x`` ``(T, N, ...)``, ``y``, ``mask``.

        ``inner_steps`` and ``step_size`` override the guide's own settings for this call only
        (nothing is mutated, so concurrent or nested calls are safe).
        """
        steps = self.inner_steps if inner_steps is None else inner_steps
        if steps < 0:
            raise ValueError(f"inner_steps must be >= 0; got {steps}")
        alpha = self.step_size if step_size is None else step_size
        return adapt_tasks(
            self.density,
            params,
            x,
            y,
            mask,
            steps=steps,
            step_size=alpha,
            first_order=self.first_order,
            joint=self.inner_objective == "joint",
            loss=self.inner_loss,
            checkpoint=self.gradient_checkpointing,
        )

    def effective_step_size(
        self, params: Mapping[str, Tensor], x: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """The step on the summed support log likelihood each task's inner step amounts to,
        ``(T,)`` (see :func:`~hierbayes.inference.core.inner_loop.effective_step_size`)."""
        with torch.no_grad():
            return effective_step_size(
                self.density, params, x, mask, self.step_size.detach(), self.inner_loss
            )

    def forward(
        self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        if y is None:
            raise TaskDataError(
                "the truncated-gradient guide adapts each task to its support targets: call it "
                "as guide(support_x, support_y)"
            )
        params = self.traced_global_values()
        for site in self.structure.global_sites:
            pyro.sample(site.name, dist.Delta(params[site.name], event_dim=site.event_dim))
        phi = self.adapt(params, x, y, mask)
        structure = self.structure
        with pyro.plate("tasks", x.shape[0], dim=structure.tasks_dim):
            pyro.sample(
                structure.task_site,
                dist.Delta(structure.to_site(phi), event_dim=len(structure.task_event_shape)),
            )
        return {**params, structure.task_site: phi}
