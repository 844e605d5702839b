r"""Meta-objectives: stateless losses with Pyro's loss interface and their task posteriors.

A meta-objective holds options only (set when it is built, never changed by a call). Its
mathematics is a pure function of the model's density, the global values ``params``, the
adapted :math:`\hat\phi` ``(T, D)`` and a :class:`~hierbayes.tasks.TaskBatch`:

* :meth:`MetaObjective.task_losses` returns :class:`TaskLosses`: one loss per task ``(T,)``
  and, for an objective that searches each task's mode, the search's
  :class:`~hierbayes.inference.core.mode_report.ModeReport` (a value, not state);
* :meth:`MetaObjective.posterior` is the task posterior the objective implies, beside it;
* :meth:`MetaObjective.meta_loss` (the fast road ``fit`` takes) is their mean plus the
  hyperprior term :math:`-\frac1J\log p(\theta)`.

The meta-loss of a batch of :math:`T` tasks from a collection of :math:`J` is

.. math::

    \mathcal L(\theta) = \frac1T \sum_{j=1}^{T} \ell_j(\theta) \;-\; \frac1J \log p(\theta),

the minibatch estimate of :math:`\frac1J[\sum_j\ell_j - \log p(\theta)]`; for an endless task
family (:math:`J=\infty`) the hyperprior drops out.

**The Pyro road**, :meth:`MetaObjective.differentiable_loss` (what ``pyro.infer.SVI`` calls),
is written the way Pyro's own ``Trace_ELBO`` is: it traces the guide on the support set,
replays the model on the query set against that trace, and takes **the model's values from the
replayed trace**: the globals and :math:`\hat\phi` as the model sees them (a
``poutine.condition``-ed global is the conditioned value), the likelihood terms as the model's
own sites score them (each with the scale and mask Pyro's handlers set), and each task's
Laplace terms weighted by the scale of its per-task site. So ``poutine.scale(s)`` scales the
loss by ``s``, ``poutine.mask`` drops tasks, ``poutine.condition`` conditions the model that is
scored, and every ``pyro.param`` reaches SVI's parameter capture. Without handlers the two
roads give the same loss and gradients (tested, with the likelihood terms of the Pyro road
computed from the trace, not by the functions of the fast road).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.inference.core.losses import HyperpriorSpace, global_log_jacobian, hyperprior_term
from hierbayes.inference.core.mode_report import ModeReport
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.models.density import TaskDensity
from hierbayes.models.structure import ModelStructure, trace_nodes
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "MetaLoss",
    "MetaObjective",
    "ReplayedModel",
    "TaskLosses",
    "as_task_batch",
    "task_scale",
]


class TaskLosses(NamedTuple):
    """What an objective's :meth:`~MetaObjective.task_losses` returns.

    Attributes
    ----------
    values:
        One loss per task, ``(T,)``.
    mode:
        The mode search's report (objectives that evaluate at each task's mode), else ``None``.
    """

    values: Tensor
    mode: ModeReport | None = None


class MetaLoss(NamedTuple):
    """The meta-loss of a batch (a scalar with its graph) and the mode report of its tasks."""

    loss: Tensor
    mode: ModeReport | None = None


class ReplayedModel(NamedTuple):
    """The model replayed against the guide's trace: what the Pyro road scores.

    Attributes
    ----------
    trace:
        The model's trace on ``x``, ``y`` (the query set, or the support set of a query-less
        batch), every site's value from the guide's trace unless the model conditions it.
    params:
        The global values as the model sees them (the replayed trace's values).
    phi:
        :math:`\\hat\\phi` ``(T, D)`` as the model sees it.
    scale:
        Each task's weight: the scale of its per-task site, zero where a mask drops it.
    x, y, mask:
        The data the model was replayed on.
    """

    trace: Trace
    params: dict[str, Tensor]
    phi: Tensor
    scale: Tensor | float
    x: Tensor
    y: Tensor
    mask: Tensor | None


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


def global_log_prob(trace: Trace, structure: ModelStructure) -> Tensor | float:
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

    A subclass implements :meth:`task_losses` (pure functions of the density, the global values
    and :math:`\\hat\\phi`), :meth:`posterior`, and, for its Pyro road, :meth:`replayed_losses`.
    Instances work with ``pyro.infer.SVI`` (which calls ``loss`` and ``loss_and_grads``),
    through :func:`~hierbayes.inference.fit`, and with any torch optimiser. No call changes an
    objective.

    Parameters
    ----------
    num_tasks:
        :math:`J`, the number of distinct training tasks, for the hyperprior's weight
        :math:`1/J`; ``None`` for an endless task family (the hyperprior then drops out).
    hyperprior_space:
        Where the global latents' hyperprior is scored
        (:func:`~hierbayes.inference.core.losses.hyperprior_term`): ``"constrained"`` as Pyro's
        ``AutoDelta`` (the default), or ``"unconstrained"`` with the log-Jacobian of each
        constraint's transform.
    """

    name = "meta-objective"
    #: Whether the objective needs each task's query set.
    needs_query = True

    def __init__(
        self, num_tasks: int | None = None, *, hyperprior_space: HyperpriorSpace = "constrained"
    ) -> None:
        if num_tasks is not None and (isinstance(num_tasks, bool) or num_tasks < 1):
            raise ValueError(f"num_tasks must be a positive integer or None; got {num_tasks}")
        if hyperprior_space not in ("constrained", "unconstrained"):
            raise ValueError(
                f"hyperprior_space must be 'constrained' or 'unconstrained'; got {hyperprior_space!r}"
            )
        self.num_tasks = num_tasks
        self.hyperprior_space: HyperpriorSpace = hyperprior_space

    # -- what a subclass provides ----------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        """The options the objective was built with (``fit`` records and saves them)."""
        return {}

    def check(self, density: TaskDensity) -> None:
        """Raise :class:`~hierbayes.errors.ModelContractError` if ``density`` lacks a
        capability this objective needs (pure; cheap: capabilities are read once per density)."""

    def bind(self, density: TaskDensity) -> None:
        """The same as :meth:`check` (the name earlier releases used)."""
        self.check(density)

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskLosses:
        """One loss per task ``(T,)``, and the mode report where the objective has one."""
        raise NotImplementedError

    def posterior(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskPosterior:
        """The task posterior the objective implies, given each task's support set."""
        raise NotImplementedError

    def replayed_losses(
        self,
        model: Callable[..., Any],
        density: TaskDensity,
        replayed: ReplayedModel,
        batch: TaskBatch,
    ) -> Tensor:
        """The Pyro road's per-task losses ``(T,)``, weighted by the handlers' task scales,
        from the model replayed against the guide (default: the pure losses at the replayed
        values, weighted by the task scales)."""
        losses = self.task_losses(density, replayed.params, replayed.phi, batch).values
        return losses * replayed.scale

    # -- the fast road ------------------------------------------------------------------------------

    def evaluate(self, guide: TruncatedGradientGuide, batch: TaskBatch) -> MetaLoss:
        """The meta-loss of ``batch`` from the guide's values, and the tasks' mode report."""
        density = guide.density
        self.check(density)
        params = guide.global_values()
        phi = guide.adapt(params, batch.support_x, batch.support_y, batch.support_mask)
        losses = self.task_losses(density, params, phi, batch)
        loss = losses.values.mean() + hyperprior_term(
            density, params, batch.support_x, self.num_tasks, self.hyperprior_space
        )
        return MetaLoss(loss, losses.mode)

    def meta_loss(self, guide: TruncatedGradientGuide, batch: TaskBatch) -> Tensor:
        """The fast road: the meta-loss from the guide's values, without Pyro's tracing."""
        return self.evaluate(guide, batch).loss

    # -- the Pyro road ------------------------------------------------------------------------------

    @staticmethod
    def _guide(guide: Any) -> TruncatedGradientGuide:
        if not isinstance(guide, TruncatedGradientGuide):
            raise TypeError(
                f"{type(guide).__name__} is not a hierbayes TruncatedGradientGuide; meta-objectives "
                "need one (hierbayes.inference.TruncatedGradientGuide(model, example_batch))"
            )
        return guide

    def replay(
        self, model: Callable[..., Any], guide: TruncatedGradientGuide, batch: TaskBatch
    ) -> ReplayedModel:
        """Trace the guide on the support set and replay ``model`` against it on the query set
        (on the support set for a query-less batch of an objective that needs no query)."""
        if self.needs_query or batch.has_query:
            x, y, mask = batch.require_query(f"the {self.name} objective")
        else:
            x, y, mask = batch.support_x, batch.support_y, batch.support_mask
        guide_trace = poutine.trace(guide).get_trace(
            batch.support_x, batch.support_y, mask=batch.support_mask
        )
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
        structure = guide.structure
        nodes = trace_nodes(trace)
        params = {site.name: nodes[site.name]["value"] for site in structure.global_sites}
        phi = structure.from_site(nodes[structure.task_site]["value"])
        return ReplayedModel(trace, params, phi, task_scale(trace, structure), x, y, mask)

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        """The Pyro road: trace the guide, replay ``model``, score it (see the module
        docstring)."""
        guide = self._guide(guide)
        batch = as_task_batch(*args, **kwargs)
        density = guide.density
        self.check(density)
        replayed = self.replay(model, guide, batch)
        loss = self.replayed_losses(model, density, replayed, batch).mean()
        if self.num_tasks is not None:
            structure = guide.structure
            loss = loss - global_log_prob(replayed.trace, structure) / self.num_tasks
            if self.hyperprior_space == "unconstrained":
                loss = loss - global_log_jacobian(density, replayed.params) / self.num_tasks
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
