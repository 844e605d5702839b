r"""Checks ``fit`` makes before any training: arguments, task sources, data against the model."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, cast

import pyro
import torch
from pyro import poutine
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.objectives import LaplaceEvidenceObjective
from hierbayes.inference.training.methods import Method, methods
from hierbayes.models.density import NetworkDensity, PyroTaskDensity
from hierbayes.models.diagnosis import support_violation
from hierbayes.models.param_store import claim_param_store, use_own_parameters
from hierbayes.models.task_model import TaskModel
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection
from hierbayes.tasks.source import TaskSource

__all__ = [
    "as_task_source",
    "check_arguments",
    "check_dtype",
    "check_empirical_bayes",
    "check_query_less",
    "check_support",
    "check_targets",
    "reset_param_sites",
    "trainable_parameters",
]


def check_arguments(
    spec: Method,
    meta_steps: int,
    meta_batch_size: int,
    lr: float,
    guide_options: Mapping[str, Any],
    control: Any,
    method_options: Mapping[str, Any],
    fit_options: Collection[str] = (),
) -> None:
    """Refuse bad settings before anything is built, naming the argument and what it takes.

    ``fit_options`` are ``fit``'s own keywords, offered as the close name of a misspelled one.
    """
    if not isinstance(meta_steps, int) or meta_steps < 0:
        raise ValueError(f"meta_steps must be a whole number >= 0; got {meta_steps!r}")
    if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be a whole number >= 1; got {meta_batch_size!r}")
    if not _positive_number(lr):
        raise ValueError(f"lr must be a finite positive number; got {lr!r}")
    step_size = guide_options["step_size"]
    if isinstance(step_size, torch.Tensor):
        if step_size.numel() == 0 or not bool((step_size.isfinite() & (step_size > 0)).all()):
            raise ValueError("step_size must hold finite positive step sizes; some are not")
    elif not _positive_number(step_size):
        raise ValueError(f"step_size must be a finite positive number; got {step_size!r}")
    inner_steps = guide_options["inner_steps"]
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a whole number >= 0; got {inner_steps!r}")
    if control.clip_grad_norm is not None and not control.clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be positive; got {control.clip_grad_norm!r}")
    if control.checkpoint_every is not None:
        if control.checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint=PATH, where to write them")
        if control.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1; got {control.checkpoint_every}")
    known = spec.options
    if known is None:
        return
    if "objective" in method_options and "objective" not in known:
        raise ValueError(
            f"method {spec.name!r} has no named objectives; got "
            f"objective={method_options['objective']!r}. Pass a MetaObjective instance, or "
            "choose a method that names its objectives (method='llama': 'predictive', "
            "'evidence', 'paper')"
        )
    for name in method_options:
        if name not in known:
            others = [o for o in fit_options if o != name]
            close = difflib.get_close_matches(name, [*known, *others], n=1)
            takers = [m for m, s in methods().items() if s.options and name in s.options]
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f" (method {takers[0]!r} takes it)."
                if takers
                else "."
            )
            raise TypeError(
                f"fit got an option {name!r} that neither fit nor method {spec.name!r} takes"
                f"{hint} The method's options: {sorted(known)}"
            )


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def as_task_source(tasks: Any) -> Any:
    """A task source from what ``fit`` was given: a source, one batch, or a list of tasks."""
    if isinstance(tasks, TaskBatch):
        return _BatchSource(tasks)
    if isinstance(tasks, TaskSource):
        return tasks
    if isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)):
        try:
            return TaskCollection(tasks)
        except TaskDataError:
            raise
        except Exception as err:
            raise TypeError(
                "tasks given as a list must be tasks as TaskCollection takes them: "
                "(support_x, support_y, query_x, query_y) tuples or dicts of arrays; "
                f"{type(err).__name__}: {err}"
            ) from err
    raise TypeError(
        "tasks must be a TaskBatch, a list of tasks (as TaskCollection takes them) or a task "
        f"source with sample(num_tasks, generator=...); got {type(tasks).__name__}"
    )


class _BatchSource:
    """A fixed :class:`TaskBatch` as a task source (random subsets of its tasks)."""

    def __init__(self, batch: TaskBatch) -> None:
        if batch.task_ids is None:  # errors then name the task by its place in the given batch
            ids = torch.arange(batch.num_tasks, device=batch.device)
            batch = dataclasses.replace(batch, task_ids=ids, validate=False)
        self.batch = batch

    @property
    def num_tasks(self) -> int:
        return self.batch.num_tasks

    def sample(
        self,
        num_tasks: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> TaskBatch:
        index = torch.randperm(self.batch.num_tasks, generator=generator)[:num_tasks]
        out = self.batch.select(index.to(self.batch.device))
        return out.to(dtype=dtype) if dtype is not None else out


def check_dtype(model: Any, batch: TaskBatch, dtype: torch.dtype | None) -> None:
    """A float data/model mismatch, caught here with advice rather than deep inside the model."""
    if not isinstance(model, torch.nn.Module):
        return
    floats = [t for t in (*model.parameters(), *model.buffers()) if torch.is_floating_point(t)]
    if not torch.is_floating_point(batch.support_x):
        takes_indices = any(isinstance(m, torch.nn.Embedding) for m in model.modules())
        if floats and not takes_indices:
            raise TaskDataError(
                f"support_x is {batch.support_x.dtype} (integers) but the model computes in "
                f"{floats[0].dtype}: give the inputs as floating-point values (e.g. "
                f"support_x.to({floats[0].dtype}), or TaskCollection(..., dtype=...) for arrays)"
            )
        return
    if floats and floats[0].dtype != batch.support_x.dtype:
        raise TaskDataError(
            f"support_x is {batch.support_x.dtype} but the model is {floats[0].dtype}: pass "
            f"dtype={batch.support_x.dtype} to fit (model and data are then converted together), "
            "or convert the data"
        )


def check_inputs(model: Any, batch: TaskBatch) -> None:
    """Run a :class:`TaskModel`'s network on one support point, so that inputs with the wrong
    number of features are reported as such rather than as a broken model."""
    if not isinstance(model, TaskModel):
        return
    network = model.net.module
    training = network.training
    network.eval()  # batch norm then reads its running statistics without updating them
    try:
        with torch.no_grad():
            network(batch.support_x[0, :1])
    except (RuntimeError, ValueError, IndexError) as err:
        raise TaskDataError(
            f"the model's network cannot take support_x points of shape "
            f"{tuple(batch.support_x.shape[2:])} (support_x is {tuple(batch.support_x.shape)}: "
            f"tasks, points, then one point's features): {type(err).__name__}: {err}. Check "
            "how many features the network's first layer expects."
        ) from err
    finally:
        network.train(training)


def reset_param_sites(model: Any, batch: TaskBatch) -> None:
    """Forget the ``pyro.param`` values a function model left in Pyro's global store, so that
    ``fit`` starts from their initial values (reproducible with ``seed``) rather than from
    whatever an earlier run trained. A ``PyroModule`` model's own parameters are kept (it
    trains from its own values); the store's entries under their names are pointed at them
    first, so this run never takes another model's values."""
    x, y = batch.support_x, batch.support_y
    try:
        with poutine.block():
            own = use_own_parameters(model, x, y)
            trace = poutine.trace(model).get_trace(x, y)
    except Exception:  # model_structure runs the model next and reports the failure
        return
    store = pyro.get_param_store()
    for name, site in trace.nodes.items():
        if site["type"] == "param" and name in store and name not in own:
            del store[name]


def check_targets(guide: TruncatedGradientGuide, batch: TaskBatch) -> None:
    """Score the batch's support and query sets once, so that targets of the wrong shape, kind
    or range are reported by field and task before training."""
    params = {k: v.detach() for k, v in guide.global_values().items()}
    sets = [("support_y", batch.support_x, batch.support_y, batch.support_mask)]
    if batch.has_query:  # query-less tasks (groups as tasks) were allowed by check_query_less
        xq, yq, mq = batch.require_query("meta-training")
        sets.append(("query_y", xq, yq, mq))
    if isinstance(guide.density, NetworkDensity):  # batch norm cannot take unequal task sizes
        guide.density.check_mask(batch.support_mask)
        guide.density.check_mask(batch.query_mask)
    for name, x, y, mask in sets:
        try:
            with torch.no_grad():
                phi = guide.density.prior_mean(params, x)
                guide.density.log_likelihood(params, phi, x, y, mask)
        except TaskDataError:
            for j in range(batch.num_tasks):  # find the first task that fails, by its id
                one = slice(j, j + 1)
                try:
                    with torch.no_grad():
                        phi = guide.density.prior_mean(params, x[one])
                        guide.density.log_likelihood(
                            params, phi, x[one], y[one], None if mask is None else mask[one]
                        )
                except TaskDataError as err:
                    task = j if batch.task_ids is None else int(batch.task_ids[j])
                    raise TaskDataError(
                        f"{name} (shape {tuple(y.shape)}) does not fit the model; for task "
                        f"{task}: {err}"
                    ) from err
            raise
        except ValueError as err:  # e.g. torch's support check: the value, not the tensor dump
            check_support(guide, params, name, x, y, mask, batch.task_ids, cause=err)
            raise


def check_support(
    guide: TruncatedGradientGuide,
    params: Mapping[str, Tensor],
    field: str,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    task_ids: Tensor | None = None,
    *,
    cause: BaseException | None = None,
) -> None:
    r"""Raise :class:`TaskDataError` naming ``field``, the task, the point and the value when an
    observed value of ``y`` lies outside its site's support (a count above a Binomial's
    ``total_count``, a Bernoulli's 2, a label out of range), with the site's support; return
    when every value is in it.

    The program runs once on ``x``, ``y`` at the prior mean of :math:`\phi` with validation
    off, so the trace holds the values (:func:`~hierbayes.models.diagnosis.support_violation`
    reads them); ``cause`` (torch's own error) becomes the ``__cause__``."""
    model, structure = guide.model, guide.structure
    claim_param_store(model, structure.module_param_sites)
    with torch.no_grad(), pyro.validation_enabled(False):
        phi = guide.density.prior_mean(params, x)
        trace = PyroTaskDensity(model, structure).trace(params, phi, x, y)
    found = support_violation(trace, structure, field, mask, task_ids)
    if found is not None:
        raise TaskDataError(
            f"{found}. Check the data against the likelihood (e.g. counts above total_count, "
            "labels numbered from 1 rather than 0)"
        ) from cause


def trainable_parameters(model: Any, guide: TruncatedGradientGuide) -> list[Tensor]:
    """The guide's parameters, the model's own, and ``pyro.param`` sites of a function model.

    A module model's own parameters come from the module (never from Pyro's store by name,
    where a model of the same name may have left its own); the store's entries under their
    names are pointed at them, so the model's runs under Pyro's handlers train them."""
    seen: dict[int, Tensor] = {}
    for p in guide.parameters():
        seen[id(p)] = p
    own = guide.structure.module_param_sites
    if isinstance(model, torch.nn.Module):
        claim_param_store(model, own)
        for p in model.parameters():
            seen[id(p)] = p
    store = pyro.get_param_store()
    for name in guide.structure.param_sites:
        if name in store and name not in own:
            # pyro.param values carry their unconstrained tensor as an attribute
            p = cast(Any, store.get_param(name)).unconstrained()
            seen[id(p)] = p
    return [p for p in seen.values() if p.requires_grad]


def check_query_less(
    method: str, objective: Any, method_options: Mapping[str, Any], batch: TaskBatch
) -> None:
    """Tasks without a query set (groups as tasks, all data in the support set) can be fitted
    only by an objective that scores all of each task's data once: the Laplace evidence.
    MAML and the query-based LLAMA objectives are refused, naming the fix."""
    if batch.has_query:
        return
    evidence = (
        isinstance(objective, LaplaceEvidenceObjective)
        if objective is not None
        else method == "llama" and method_options.get("objective") == "evidence"
    )
    if not evidence:
        chosen = (
            type(objective).__name__
            if objective is not None
            else f"method={method!r}"
            + (
                f", objective={method_options['objective']!r}"
                if "objective" in method_options
                else ""
            )
        )
        raise TaskDataError(
            f"meta-training needs a query set for {chosen}, which scores held-out query data "
            "after adapting to the support set, but these tasks have none (all of each task's "
            "data is its support set). To fit on all of each group's data (empirical Bayes), use "
            "fit(..., method='llama', objective='evidence'), which scores each task's data once "
            "by its marginal likelihood; for MAML or a query-based objective, split each task's "
            "points into support and query sets"
        )
    data = method_options.get("curvature_data", getattr(objective, "curvature_data", None))
    if data == "query":
        raise TaskDataError(
            "curvature_data='query' needs a query set, and these tasks have none: leave "
            "curvature_data at its default (all of each task's data)"
        )


def check_empirical_bayes(options: Mapping[str, Any]) -> dict[str, Any]:
    """``fit``'s full-batch and convergence options, checked; defaults filled in."""
    values = {
        "full_batch": None,
        "grad_tolerance": 1e-6,
        "loss_tolerance": 1e-12,
        "hyperprior_space": "constrained",
        **options,
    }
    if values["full_batch"] not in (None, True, False):
        raise ValueError(f"full_batch must be None, True or False; got {values['full_batch']!r}")
    for name in ("grad_tolerance", "loss_tolerance"):
        value = values[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    if values["hyperprior_space"] not in ("constrained", "unconstrained"):
        raise ValueError(
            "hyperprior_space must be 'constrained' (the density of each global's value, as "
            "Pyro's AutoDelta) or 'unconstrained' (with the log-Jacobian of its transform); got "
            f"{values['hyperprior_space']!r}"
        )
    return values
