r"""``fit(model, tasks)``: meta-train a hierbayes model and return a plain result object.

Meta-training is stochastic optimisation of a meta-objective (MAML's query likelihood, or a
Laplace objective) over batches of tasks, with the truncated-gradient guide as the amortised
task posterior. ``fit`` takes the fast road of the objectives
(:meth:`~hierbayes.inference.MetaObjective.meta_loss`: the pure functions of
:mod:`hierbayes.inference.core` on the guide's values); the Pyro road that ``pyro.infer.SVI``
takes gives the same loss and gradients (tested). The optimiser works on the guide's and the
model's own parameters.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import pyro
import torch
from pyro import poutine
from torch import Tensor
from tqdm.auto import tqdm

from hierbayes.errors import NumericalError, TaskDataError
from hierbayes.inference.svi.guide import InnerObjective, StepSizeMode, TruncatedGradientGuide
from hierbayes.inference.svi.objectives import MetaObjective
from hierbayes.inference.training.methods import get_method
from hierbayes.inference.training.result import FitResult, MetaTrainingDiverged
from hierbayes.models.density import NetworkDensity
from hierbayes.models.task_model import TaskModel
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.source import TaskSource

__all__ = ["fit"]


class _BatchSource:
    """A fixed :class:`TaskBatch` as a task source (random subsets of its tasks)."""

    def __init__(self, batch: TaskBatch) -> None:
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


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
    return dev


def fit(
    model: Any,
    tasks: TaskSource | TaskBatch,
    *,
    method: str = "maml",
    meta_steps: int = 1000,
    meta_batch_size: int = 25,
    inner_steps: int = 1,
    step_size: float = 0.01,
    learn_step_size: StepSizeMode = "fixed",
    first_order: bool = False,
    inner_objective: InnerObjective = "likelihood",
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    guide: TruncatedGradientGuide | None = None,
    objective: MetaObjective | str | None = None,
    callback: Callable[[int, float, FitResult], None] | None = None,
    **method_options: Any,
) -> FitResult:
    r"""Meta-train ``model`` on ``tasks`` and return a :class:`FitResult`.

    Parameters
    ----------
    model:
        A hierbayes model (a Pyro program following :mod:`hierbayes.models.structure`).
    tasks:
        A task source (:class:`~hierbayes.tasks.SinusoidTasks`,
        :class:`~hierbayes.tasks.TaskCollection`, :class:`~hierbayes.tasks.EpisodicSampler`,
        anything with ``sample(num_tasks, generator=...)``) or one :class:`TaskBatch`.
    method:
        A registered method: ``"maml"`` (default) or, see :func:`methods`, ``"llama"``.
    meta_steps, meta_batch_size, lr:
        Adam steps, tasks per step, and Adam's learning rate.
    inner_steps, step_size, learn_step_size, first_order, inner_objective:
        The guide's options (:class:`~hierbayes.inference.TruncatedGradientGuide`).
    seed:
        Seeds both torch and the task sampler; a run is reproducible on one device.
    device, dtype:
        Where and in which floating-point type to train (``"cpu"`` or ``"cuda"``).
    guide, objective:
        A pre-built guide or objective instead of the ones the method builds; ``objective``
        may also name a variant of the method (``"predictive"``, ``"evidence"``, ``"paper"``
        for ``"llama"``).
    callback:
        Called as ``callback(step, loss, result)`` after every meta-step.

    Notes
    -----
    ``fit`` trains ``model`` and the guide in place (fit a fresh model for each run you want
    to keep), moves the model to ``device``/``dtype``, and seeds torch's global generator with
    ``seed``. A pre-built ``guide`` brings its own inner-loop settings; ``inner_steps``,
    ``step_size`` and the other guide options are then not used.
    **method_options:
        Passed to the method's objective (e.g. ``curvature="ggn"`` for ``"llama"``).

    Raises
    ------
    MetaTrainingDiverged
        If the objective becomes NaN or infinite; its ``result`` holds the last finite state.
    """
    spec = get_method(method)
    if isinstance(objective, str):
        method_options["objective"] = objective
        objective = None
    if meta_steps < 0 or meta_batch_size < 1:
        raise ValueError(
            f"need meta_steps >= 0 and meta_batch_size >= 1; got {meta_steps}, {meta_batch_size}"
        )
    dev = _resolve_device(device)
    source: Any = _BatchSource(tasks) if isinstance(tasks, TaskBatch) else tasks
    if not isinstance(source, TaskSource):
        raise TypeError(
            f"tasks must be a TaskBatch or a task source with sample(num_tasks, generator=...); "
            f"got {type(tasks).__name__}"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, torch.nn.Module):
        model.to(device=dev, dtype=dtype)
    first = source.sample(meta_batch_size, generator=generator, dtype=dtype)
    first = TaskBatch(
        first.support_x,
        first.support_y,
        first.query_x,
        first.query_y,
        first.support_mask,
        first.query_mask,
        first.task_ids,
        first.info,
    ).to(dev)  # re-validated
    first.require_query("meta-training")
    _check_dtype(model, first, dtype)
    if not isinstance(model, torch.nn.Module) and guide is None:
        _reset_param_sites(model, first)
    config = dict(
        method=method,
        meta_steps=meta_steps,
        meta_batch_size=meta_batch_size,
        inner_steps=inner_steps,
        step_size=step_size,
        learn_step_size=learn_step_size,
        first_order=first_order,
        inner_objective=inner_objective,
        lr=lr,
        seed=seed,
        device=str(dev),
        dtype=dtype,
        **method_options,
    )
    if guide is None:
        guide = TruncatedGradientGuide(
            model,
            first,
            inner_steps=inner_steps,
            step_size=step_size,
            learn_step_size=learn_step_size,
            first_order=first_order,
            inner_objective=inner_objective,
        )
    guide.to(device=dev, dtype=dtype)
    _check_targets(guide, first)
    if objective is None:
        try:
            objective = spec.objective(num_tasks=source.num_tasks, **method_options)
        except TypeError as err:
            raise ValueError(
                f"method {method!r} does not take the options {sorted(method_options)} ({err})"
            ) from err
    objective.bind(guide.density)  # declared capabilities, checked before any training
    result = FitResult(model, guide, objective, method, [], config)
    parameters = _trainable_parameters(model, guide)
    optim = torch.optim.Adam(parameters, lr=lr)
    start = time.perf_counter()
    batch = first
    bar = tqdm(
        range(meta_steps), disable=not progress, desc=f"meta-training ({method})", mininterval=1.0
    )
    for step in bar:
        if step > 0:
            batch = source.sample(meta_batch_size, generator=generator, dtype=dtype).to(dev)
        optim.zero_grad(set_to_none=True)
        try:
            loss = objective.meta_loss(guide, batch)
            value = float(loss.detach())
            cause = None
        except NumericalError as err:
            value, cause = float("nan"), err
        if not math.isfinite(value):
            result.wall_time = time.perf_counter() - start
            raise MetaTrainingDiverged(
                f"meta-step {step}: the {method} objective is {value}"
                + (f" ({cause})" if cause else "")
                + f". The parameters are those after step {step - 1} (in the exception's "
                f".result). Try a smaller step_size (now {step_size}) or lr (now {lr}), fewer "
                "inner_steps, or float64.",
                result,
            ) from cause
        loss.backward()
        if not _gradients_finite(parameters):
            bad = [
                p
                for p in parameters
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            ]
            result.wall_time = time.perf_counter() - start
            raise MetaTrainingDiverged(
                f"meta-step {step}: the {method} objective is finite ({value:.6g}) but its gradient "
                f"holds NaN or infinite values in {len(bad)} parameter tensor(s); no step was taken, "
                f"so the parameters are those after step {step - 1} (in the exception's .result). "
                "Try float64, a smaller step_size or lr.",
                result,
            )
        optim.step()
        result.history.append(value)
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        if callback is not None:
            callback(step, value, result)
    result.wall_time = time.perf_counter() - start
    _warn_if_prior_collapsed(model, result)
    return result


def _gradients_finite(parameters: list[Tensor]) -> bool:
    """Whether every gradient is finite, with one synchronisation: a sum is NaN or infinite
    when any of its terms is (an overflow of finite terms would only cause a false alarm)."""
    total: Tensor | None = None
    for p in parameters:
        if p.grad is not None:
            s = p.grad.sum()
            total = s if total is None else total + s
    return total is None or bool(torch.isfinite(total))


def _check_dtype(model: Any, batch: TaskBatch, dtype: torch.dtype | None) -> None:
    """A float data/model mismatch, caught here with advice rather than deep inside the model."""
    if not isinstance(model, torch.nn.Module) or not torch.is_floating_point(batch.support_x):
        return
    floats = [t for t in (*model.parameters(), *model.buffers()) if torch.is_floating_point(t)]
    if floats and floats[0].dtype != batch.support_x.dtype:
        raise TaskDataError(
            f"support_x is {batch.support_x.dtype} but the model is {floats[0].dtype}: pass "
            f"dtype={batch.support_x.dtype} to fit (model and data are then converted together), "
            "or convert the data"
        )


def _reset_param_sites(model: Any, batch: TaskBatch) -> None:
    """Forget the ``pyro.param`` values a function model left in Pyro's global store, so that
    ``fit`` starts from their initial values (reproducible with ``seed``) rather than from
    whatever an earlier run trained."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(batch.support_x, batch.support_y)
    store = pyro.get_param_store()
    for name, site in trace.nodes.items():
        if site["type"] == "param" and name in store:
            del store[name]


def _check_targets(guide: TruncatedGradientGuide, batch: TaskBatch) -> None:
    """Score one task's support and query sets once, so that targets of the wrong shape or kind
    are reported by field before training."""
    params = guide.global_values()
    one = batch.select(slice(0, 1))
    phi = guide.density.prior_mean({k: v.detach() for k, v in params.items()}, one.support_x)
    xq, yq, mq = one.require_query("meta-training")
    assert batch.query_y is not None
    if isinstance(guide.density, NetworkDensity):  # batch norm cannot take unequal task sizes
        guide.density.check_mask(batch.support_mask)
        guide.density.check_mask(batch.query_mask)
    for name, x, y, mask, full in (
        ("support_y", one.support_x, one.support_y, one.support_mask, batch.support_y),
        ("query_y", xq, yq, mq, batch.query_y),
    ):
        try:
            with torch.no_grad():
                guide.density.log_likelihood(params, phi.detach(), x, y, mask)
        except TaskDataError as err:
            raise TaskDataError(
                f"{name} (shape {tuple(full.shape)}) does not fit the model; for task 0: {err}"
            ) from err


def _warn_if_prior_collapsed(model: Any, result: FitResult) -> None:
    """Warn when a learned prior scale ended far below where it started: the Laplace posterior
    N(phi_hat, H^-1) is then close to a point mass."""
    scale = result.params.get("prior_scale")
    start = model.prior_scale_init if isinstance(model, TaskModel) else None
    if scale is None or start is None or scale.numel() != 1:
        return
    if float(scale) < 0.01 * float(start):
        warnings.warn(
            f"the learned prior scale fell from {start:g} to {float(scale):.3g}: the {result.method} "
            "objective found no use for weight uncertainty, so the task posteriors are close to "
            "point masses and predictive intervals come from the noise scale alone. Fix the "
            "prior scale (learn_prior_scale=False) to keep a Laplace posterior with real width.",
            UserWarning,
            stacklevel=3,
        )


def _trainable_parameters(model: Any, guide: TruncatedGradientGuide) -> list[Tensor]:
    """The guide's parameters, the model's own, and ``pyro.param`` sites of a function model."""
    seen: dict[int, Tensor] = {}
    for p in guide.parameters():
        seen[id(p)] = p
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            seen[id(p)] = p
    store = pyro.get_param_store()
    for name in guide.structure.param_sites:
        if name in store:
            # pyro.param values carry their unconstrained tensor as an attribute
            p = cast(Any, store.get_param(name)).unconstrained()
            seen[id(p)] = p
    return [p for p in seen.values() if p.requires_grad]
