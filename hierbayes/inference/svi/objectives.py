r"""Meta-objectives as Pyro losses: ``SVI(model, guide, optim, loss=MAMLObjective())``.

The MAML objective (Finn et al. 2017; Grant et al. 2018, eq. 1 and 3) is the negative log
likelihood of each task's query set at the guide's point estimate, averaged over the tasks of
a batch. With global latents that have hyperpriors (type-II MAP over a collection of
:math:`J` tasks) the hyperprior enters with weight :math:`1/J`:

.. math::

    \mathcal L(\theta) = -\frac1T \sum_{j=1}^{T} \log p(y^q_j \mid \hat\phi_j(\theta), x^q_j)
                         \;-\; \frac1J \log p(\theta)

which is the minibatch estimate of :math:`-\frac1J[\log p(\theta) + \sum_j \log p(y^q_j\mid
\hat\phi_j)]`. For an endless task family (:math:`J=\infty`) the hyperprior drops out.

Two roads, one set of numbers (the tests check both give the same loss and gradients):

* **The Pyro road**, :meth:`MetaObjective.differentiable_loss` (what ``SVI`` calls), is
  written the way Pyro's own ``Trace_ELBO`` is: it traces the guide on the support set,
  replays the model on the query set against that trace and scores the model's sites. Every
  handler applies without special cases: ``poutine.scale``/``mask`` scale the sites,
  ``poutine.condition`` conditions the model that is scored, and every ``pyro.param``
  statement (the guide's point estimates and step sizes, a model's ``pyro.param`` sites or
  ``PyroParam`` attributes) reaches ``SVI``'s parameter capture and so is trained.
* **The fast road**, :meth:`MetaObjective.meta_loss` (what :func:`~hierbayes.inference.fit`
  calls), evaluates the same pure functions (:mod:`hierbayes.inference.core`) on the guide's
  values without Pyro's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.inference.core.losses import (
    HyperpriorSpace,
    global_log_jacobian,
    hyperprior_term,
    query_nll,
)
from hierbayes.inference.svi.guide import TruncatedGradientGuide
from hierbayes.models.density import TaskDensity
from hierbayes.models.structure import ModelStructure, per_task_log_prob, trace_nodes
from hierbayes.tasks.batch import TaskBatch

__all__ = ["MAMLObjective", "MetaObjective", "as_task_batch", "task_scale"]


def as_task_batch(*args: Any, **kwargs: Any) -> TaskBatch:
    """A :class:`TaskBatch` from ``(batch,)`` or ``(support_x, support_y, query_x, query_y)``."""
    if len(args) == 1 and not kwargs and isinstance(args[0], TaskBatch):
        return args[0]
    if "batch" in kwargs and not args:
        batch = kwargs["batch"]
        if isinstance(batch, TaskBatch):
            return batch
    names = ("support_x", "support_y", "query_x", "query_y")
    values = dict(zip(names, args, strict=False))
    values.update(kwargs)
    unknown = set(values) - set(names)
    if unknown or len(args) > 4:
        raise TypeError(
            "a meta-objective takes a TaskBatch, or support_x, support_y, query_x, query_y; "
            f"got {len(args)} positional arguments and keywords {sorted(kwargs)}"
        )
    if "support_x" not in values or "support_y" not in values:
        raise TaskDataError("a meta-objective needs support_x and support_y")
    return TaskBatch(**values)


def task_scale(trace: Trace, structure: ModelStructure) -> Tensor | float:
    """The weight Pyro's handlers put on each task: the scale of the per-task latent site in
    ``trace`` (``poutine.scale``, a subsampling plate), zero where its mask
    (``poutine.mask``) drops the task. A number, or one per task ``(T,)``."""
    site = trace_nodes(trace)[structure.task_site]
    weight: Tensor | float = site["scale"]
    mask = site["mask"]
    if isinstance(mask, bool):
        return weight if mask else 0.0
    if mask is None and not isinstance(weight, Tensor):
        return float(weight)
    batch_shape = site["value"].shape[: structure.task_batch_ndim]
    value = torch.as_tensor(weight, dtype=site["value"].dtype, device=site["value"].device)
    if mask is not None:
        value = value * mask.to(value.dtype)
    return value.expand(batch_shape).reshape(-1)


def _global_log_prob(trace: Trace, structure: ModelStructure) -> Tensor | float:
    """The log density of the model's global latent sites in ``trace``, each with the scale and
    mask Pyro's handlers set on it."""
    total: Tensor | float = 0.0
    for site in structure.global_sites:
        node = trace_nodes(trace)[site.name]
        log_prob = node["fn"].log_prob(node["value"])
        total = total + scale_and_mask(log_prob, node["scale"], node["mask"]).sum()
    return total


class MetaObjective:
    """Base class of hierbayes' meta-objectives, with Pyro's loss interface.

    A subclass implements :meth:`task_losses`, one loss per task from pure functions of the
    density, the global values and :math:`\\hat\\phi`. Instances work with ``pyro.infer.SVI``
    (which calls ``loss`` and ``loss_and_grads``), through :func:`~hierbayes.inference.fit`,
    and directly with any torch optimiser.

    Parameters
    ----------
    num_tasks:
        :math:`J`, the number of distinct training tasks, for the hyperprior's weight
        :math:`1/J`; ``None`` for an endless task family (the hyperprior then drops out).
    """

    name = "meta-objective"
    #: Where the global latents' hyperprior is scored (see
    #: :func:`~hierbayes.inference.core.losses.hyperprior_term`): ``"constrained"`` as Pyro's
    #: ``AutoDelta`` (the default), or ``"unconstrained"`` with the log-Jacobian of each
    #: constraint's transform; ``fit(..., hyperprior_space=...)`` sets it.
    hyperprior_space: HyperpriorSpace = "constrained"

    def __init__(self, num_tasks: int | None = None) -> None:
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer or None; got {num_tasks}")
        self.num_tasks = num_tasks
        self._bound: TaskDensity | None = None

    # -- what a subclass provides ----------------------------------------------------------------

    def check(self, density: TaskDensity) -> None:
        """Raise :class:`~hierbayes.errors.ModelContractError` if ``density`` lacks a
        capability this objective needs (called once per density)."""

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> Tensor:
        """One loss per task, ``(T,)``."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------

    def bind(self, density: TaskDensity) -> None:
        """Check ``density``'s declared capabilities once (repeated calls are free)."""
        if self._bound is not density:
            self.check(density)
            self._bound = density

    @staticmethod
    def _guide(guide: Any) -> TruncatedGradientGuide:
        if not isinstance(guide, TruncatedGradientGuide):
            raise TypeError(
                f"{type(guide).__name__} is not a hierbayes TruncatedGradientGuide; meta-objectives "
                "need one (hierbayes.inference.TruncatedGradientGuide(model, example_batch))"
            )
        return guide

    def meta_loss(self, guide: TruncatedGradientGuide, batch: TaskBatch) -> Tensor:
        """The fast road: the meta-loss from the guide's values, without Pyro's tracing."""
        density = guide.density
        self.bind(density)
        params = guide.global_values()
        phi = guide.adapt(params, batch.support_x, batch.support_y, batch.support_mask)
        losses = self.task_losses(density, params, phi, batch)
        return losses.mean() + hyperprior_term(
            density, params, batch.support_x, self.num_tasks, self.hyperprior_space
        )

    def _traces(
        self, model: Callable[..., Any], guide: TruncatedGradientGuide, batch: TaskBatch
    ) -> tuple[Trace, Trace]:
        """The guide's trace on the support set and the model's, replayed on the query set."""
        xq, yq, _ = batch.require_query(f"the {self.name} objective")
        guide_trace = poutine.trace(guide).get_trace(
            batch.support_x, batch.support_y, mask=batch.support_mask
        )
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(xq, yq)
        return guide_trace, model_trace

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        """The Pyro road: trace the guide, replay ``model`` on the query set, score it.

        Each task's loss is weighted by the scale Pyro's handlers put on its per-task site
        (so ``poutine.scale(s)`` scales the loss by ``s``), and the hyperprior by the scales
        of the global sites.
        """
        guide = self._guide(guide)
        batch = as_task_batch(*args, **kwargs)
        guide_trace, model_trace = self._traces(model, guide, batch)
        structure = guide.structure
        params = {
            site.name: trace_nodes(guide_trace)[site.name]["value"]
            for site in structure.global_sites
        }
        phi = structure.from_site(trace_nodes(guide_trace)[structure.task_site]["value"])
        self.bind(guide.density)
        losses = self.task_losses(guide.density, params, phi, batch)
        loss = (losses * task_scale(model_trace, structure)).mean()
        if self.num_tasks is not None:
            loss = loss - _global_log_prob(model_trace, structure) / self.num_tasks
            if self.hyperprior_space == "unconstrained":
                loss = loss - global_log_jacobian(guide.density, params) / self.num_tasks
        return loss

    def __call__(self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any) -> Tensor:
        return self.differentiable_loss(model, guide, *args, **kwargs)

    def loss(self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any) -> float:
        """The loss as a float (the inner loop still needs gradients, so none are disabled)."""
        return float(self.differentiable_loss(model, guide, *args, **kwargs).detach())

    def loss_and_grads(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> float:
        """The loss as a float, after back-propagating it (what ``SVI.step`` calls)."""
        value = self.differentiable_loss(model, guide, *args, **kwargs)
        value.backward()
        return float(value.detach())


class MAMLObjective(MetaObjective):
    r"""The MAML meta-objective: query negative log likelihood at :math:`\hat\phi`.

    .. math::

        \mathcal L = -\frac1T\sum_j \log p(y^q_j\mid\hat\phi_j, x^q_j) - \frac1J\log p(\theta)

    On the Pyro road the query likelihood is the sum of the replayed model's observed sites,
    each with its own scale and mask, exactly as ``Trace_ELBO`` scores a model.
    """

    name = "maml"

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> Tensor:
        return query_nll(density, params, phi, batch)

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        guide = self._guide(guide)
        batch = as_task_batch(*args, **kwargs)
        _, model_trace = self._traces(model, guide, batch)
        structure = guide.structure
        T = batch.num_tasks
        log_lik = per_task_log_prob(model_trace, structure, T, batch.query_mask)
        loss = -log_lik.mean()
        if self.num_tasks is not None:
            loss = loss - _global_log_prob(model_trace, structure) / self.num_tasks
            if self.hyperprior_space == "unconstrained":
                params = {
                    s.name: trace_nodes(model_trace)[s.name]["value"]
                    for s in structure.global_sites
                }
                loss = loss - global_log_jacobian(guide.density, params) / self.num_tasks
        return loss
