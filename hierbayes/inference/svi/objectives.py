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

A loss object is called with the model, the guide and a :class:`~hierbayes.tasks.TaskBatch`
(or ``support_x, support_y, query_x, query_y``). It runs the guide on the support set under
``poutine.trace`` and scores the model on the query set at the traced values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pyro import poutine
from pyro.poutine.runtime import am_i_wrapped
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.models.contract import ModelStructure, TaskDensity
from hierbayes.tasks.batch import TaskBatch

__all__ = ["GuideValues", "MAMLObjective", "MetaObjective", "as_task_batch", "run_guide"]


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


class GuideValues:
    """What one traced run of a :class:`~hierbayes.inference.TruncatedGradientGuide` gave."""

    def __init__(self, params: Mapping[str, Tensor], phi: Tensor) -> None:
        self.params = dict(params)
        self.phi = phi


def run_guide(guide: Any, structure: ModelStructure, batch: TaskBatch) -> GuideValues:
    r"""Run ``guide`` on the support set; return the global values and :math:`\hat\phi` ``(T, D)``.

    Inside any Pyro effect handler (``SVI``'s parameter capture, ``poutine.scale``,
    ``poutine.block``, a user's ``poutine.trace``) the guide runs as a Pyro program under
    ``poutine.trace``, so every handler sees its ``pyro.param`` and ``pyro.sample`` statements.
    With no handler active (as in :func:`~hierbayes.inference.training.fit`) the same values come from
    the guide's pure functions, ``global_values`` and ``adapt``, without Pyro's bookkeeping;
    the tests check that both give the same loss and gradients.
    """
    if not am_i_wrapped() and hasattr(guide, "adapt") and hasattr(guide, "global_values"):
        params = guide.global_values()
        return GuideValues(
            params, guide.adapt(params, batch.support_x, batch.support_y, batch.support_mask)
        )
    trace = poutine.trace(guide).get_trace(
        batch.support_x, batch.support_y, mask=batch.support_mask
    )
    params = {site.name: trace.nodes[site.name]["value"] for site in structure.global_sites}
    phi = structure.from_site(trace.nodes[structure.task_site]["value"])
    return GuideValues(params, phi)


class MetaObjective:
    """Base class of hierbayes' meta-objectives, with Pyro's loss interface.

    Subclasses implement :meth:`differentiable_loss`. Instances work with ``pyro.infer.SVI``
    (which calls ``loss`` and ``loss_and_grads``) and directly with any torch optimiser.

    Parameters
    ----------
    num_tasks:
        :math:`J`, the number of distinct training tasks, for the hyperprior's weight
        :math:`1/J`; ``None`` for an endless task family (the hyperprior then drops out).
    """

    name = "meta-objective"

    def __init__(self, num_tasks: int | None = None) -> None:
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer or None; got {num_tasks}")
        self.num_tasks = num_tasks

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        raise NotImplementedError

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

    @staticmethod
    def check_pair(model: Callable[..., Any], guide: Any) -> None:
        """Raise unless ``guide`` is a truncated-gradient guide built for ``model``."""
        built_for = getattr(guide, "model", None)
        if built_for is None or not hasattr(guide, "density"):
            raise TypeError(
                f"{type(guide).__name__} is not a hierbayes TruncatedGradientGuide; meta-objectives "
                "need one (hierbayes.inference.TruncatedGradientGuide(model, example_batch))"
            )
        if built_for is not model:
            raise ValueError("the guide was built for a different model than the one passed")

    def hyperprior_term(
        self, density: TaskDensity, params: Mapping[str, Tensor], x: Tensor
    ) -> Tensor | float:
        r""":math:`-\frac1J \log p(\text{globals})`, or 0 for an endless family."""
        if self.num_tasks is None or not density.structure.global_sites:
            return 0.0
        return -density.log_hyperprior(params, x) / self.num_tasks


class MAMLObjective(MetaObjective):
    r"""The MAML meta-objective: query negative log likelihood at :math:`\hat\phi`.

    .. math::

        \mathcal L = -\frac1T\sum_j \log p(y^q_j\mid\hat\phi_j, x^q_j) - \frac1J\log p(\theta)

    ``differentiable_loss(model, guide, batch)`` needs ``guide`` to be a
    :class:`~hierbayes.inference.TruncatedGradientGuide` of ``model``.
    """

    name = "maml"

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        self.check_pair(model, guide)
        batch = as_task_batch(*args, **kwargs)
        xq, yq, mq = batch.require_query("the MAML objective")
        structure: ModelStructure = guide.structure
        density: TaskDensity = guide.density
        values = run_guide(guide, structure, batch)
        log_lik = density.log_likelihood(values.params, values.phi, xq, yq, mq)
        return -log_lik.mean() + self.hyperprior_term(density, values.params, xq)
