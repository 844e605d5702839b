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

import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hierbayes.errors import ModelContractError
from hierbayes.inference.core.inner_loop import InnerLoss
from hierbayes.inference.svi.guide import InnerObjective, StepSizeMode, TruncatedGradientGuide
from hierbayes.inference.svi.objectives import MetaObjective
from hierbayes.inference.training.checks import (
    as_task_source,
    check_arguments,
    check_dtype,
    check_inputs,
    check_targets,
    reset_param_sites,
    trainable_parameters,
)
from hierbayes.inference.training.guards import boundary_warnings, warning_tally
from hierbayes.inference.training.loop import TrainingControl, TrainingRun
from hierbayes.inference.training.methods import get_method
from hierbayes.inference.training.persistence import read_run, restore_run
from hierbayes.inference.training.result import FitResult, TrainingState
from hierbayes.models.task_model import TaskModel
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.source import TaskSource

__all__ = ["fit"]

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
    return dev


def fit(
    model: Any,
    tasks: TaskSource | TaskBatch | Sequence[Any],
    *,
    method: str = "maml",
    meta_steps: int = 1000,
    meta_batch_size: int = 25,
    inner_steps: int = 1,
    step_size: float = 0.01,
    learn_step_size: StepSizeMode = "fixed",
    first_order: bool = False,
    inner_objective: InnerObjective = "likelihood",
    inner_loss: InnerLoss = "sum",
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    guide: TruncatedGradientGuide | None = None,
    objective: MetaObjective | str | None = None,
    callback: Callable[[int, float, FitResult], None] | None = None,
    optimizer: OptimizerFactory | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    clip_grad_norm: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    metrics_log: str | os.PathLike[str] | None = None,
    log_every: int = 100,
    check_every: int = 250,
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
        anything with ``sample(num_tasks, generator=...)``), one :class:`TaskBatch`, or a list
        of tasks as :class:`~hierbayes.tasks.TaskCollection` takes them.
    method:
        A registered method: ``"maml"`` (default) or, see :func:`methods`, ``"llama"``.
    meta_steps:
        The total number of meta-steps of the run (a resumed run continues up to it).
    meta_batch_size, lr:
        Tasks per step, and the learning rate of the default optimiser (Adam).
    inner_steps, step_size, learn_step_size, first_order, inner_objective, inner_loss:
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
    optimizer:
        ``optimizer(parameters) -> torch.optim.Optimizer`` (default: Adam with ``lr``).
    lr_scheduler:
        ``lr_scheduler(optimizer) -> torch.optim.lr_scheduler.LRScheduler``, stepped once per
        meta-step.
    clip_grad_norm:
        Clip the meta-gradient's norm to this value (``torch.nn.utils.clip_grad_norm_``).
    checkpoint, checkpoint_every:
        Write the run to ``checkpoint`` (atomically) every ``checkpoint_every`` meta-steps, at
        the end, and when the run is interrupted or diverges.
    resume:
        A checkpoint (or a file ``FitResult.save`` wrote) to continue from: parameters,
        optimiser and schedule state, history and random-number generators are restored, so
        the run takes exactly the steps an uninterrupted one would have. The run's settings
        must equal the checkpoint's (a mismatch is an error that lists them); pass a freshly
        built model.
    metrics_log:
        Append one JSON line per meta-step (step, loss, learning rate, gradient norm, seconds).
    log_every:
        Log progress to the ``logging`` logger ``"hierbayes.fit"`` every this many steps.
    check_every:
        Check every this many steps that the inner loop lowers the support loss (warn) and has
        not diverged (error); ``0`` turns the check off.
    **method_options:
        Passed to the method's objective (e.g. ``curvature="ggn"`` for ``"llama"``).

    Notes
    -----
    ``fit`` trains ``model`` and the guide in place (fit a fresh model for each run you want
    to keep), moves the model to ``device``/``dtype``, and seeds torch's global generator with
    ``seed``. A pre-built ``guide`` brings its own inner-loop settings. Each distinct warning
    of a run is issued once, with how often it fired.

    Raises
    ------
    MetaTrainingDiverged
        If the objective or its gradient becomes NaN or infinite, jumps by orders of magnitude,
        or the inner loop diverges; its ``result`` holds the last good state.
    MetaTrainingInterrupted
        On Ctrl-C (a ``KeyboardInterrupt``); its ``result`` holds the steps completed.
    """
    with warning_tally():
        return _fit(
            model,
            tasks,
            method=method,
            meta_steps=meta_steps,
            meta_batch_size=meta_batch_size,
            guide_options=dict(
                inner_steps=inner_steps,
                step_size=step_size,
                learn_step_size=learn_step_size,
                first_order=first_order,
                inner_objective=inner_objective,
                inner_loss=inner_loss,
            ),
            lr=lr,
            seed=seed,
            device=device,
            dtype=dtype,
            progress=progress,
            guide=guide,
            objective=objective,
            callback=callback,
            control=TrainingControl(
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                clip_grad_norm=clip_grad_norm,
                checkpoint=None if checkpoint is None else Path(checkpoint),
                checkpoint_every=checkpoint_every,
                metrics_log=None if metrics_log is None else Path(metrics_log),
                log_every=log_every,
                check_every=check_every,
            ),
            resume=None if resume is None else Path(resume),
            method_options=method_options,
        )


#: fit's own keywords, suggested for a misspelled option.
_FIT_OPTIONS = tuple(inspect.signature(fit).parameters)


def _fit(
    model: Any,
    tasks: Any,
    *,
    method: str,
    meta_steps: int,
    meta_batch_size: int,
    guide_options: dict[str, Any],
    lr: float,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    guide: TruncatedGradientGuide | None,
    objective: MetaObjective | str | None,
    callback: Callable[[int, float, FitResult], None] | None,
    control: TrainingControl,
    resume: Path | None,
    method_options: dict[str, Any],
) -> FitResult:
    spec = get_method(method)
    if isinstance(objective, str):
        method_options["objective"] = objective
        objective = None
    check_arguments(
        spec,
        meta_steps,
        meta_batch_size,
        lr,
        guide_options,
        control,
        method_options,
        fit_options=_FIT_OPTIONS,
    )
    if not callable(model):
        raise ModelContractError(
            f"fit needs a model: a Pyro program model(x, y=None) (or a hierbayes TaskModel); "
            f"got {type(model).__name__}"
        )
    saved = read_run(resume) if resume is not None else None
    dev = _resolve_device(device)
    source = as_task_source(tasks)
    if (
        not isinstance(tasks, TaskBatch)  # one batch given: training on all of it is the point
        and source.num_tasks is not None
        and meta_batch_size > source.num_tasks
    ):
        warnings.warn(
            f"meta_batch_size={meta_batch_size} is larger than the {source.num_tasks} tasks "
            f"available: every meta-step uses all {source.num_tasks}",
            UserWarning,
            stacklevel=4,
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
    check_dtype(model, first, dtype)
    check_inputs(model, first)
    if not isinstance(model, torch.nn.Module) and guide is None:
        reset_param_sites(model, first)
    config = dict(
        method=method,
        meta_steps=meta_steps,
        meta_batch_size=meta_batch_size,
        **guide_options,
        lr=lr,
        seed=seed,
        device=str(dev),
        dtype=dtype,
        num_tasks=source.num_tasks,
        **method_options,
    )
    if guide is None:
        guide = TruncatedGradientGuide(model, first, **guide_options)
    guide.to(device=dev, dtype=dtype)
    check_targets(guide, first)
    if objective is None:
        objective = spec.objective(num_tasks=source.num_tasks, **method_options)
    objective.bind(guide.density)  # declared capabilities, checked before any training
    result = FitResult(model, guide, objective, method, [], config)
    result.example = (first.support_x[:1].detach(), first.support_y[:1].detach())
    parameters = trainable_parameters(model, guide)
    if not parameters:
        raise ModelContractError(
            "the model has nothing for meta-training to learn: no global latent (a sample site "
            "outside pyro.plate('tasks')), no pyro.param and no learned step size. Add theta, "
            "e.g. theta = pyro.sample('theta', dist.Normal(torch.zeros(D), 10.0).to_event(1)), "
            "and use it as the prior mean of the per-task latent"
        )
    optim = (
        control.optimizer(parameters)
        if control.optimizer is not None
        else torch.optim.Adam(parameters, lr=lr)
    )
    scheduler = control.lr_scheduler(optim) if control.lr_scheduler is not None else None
    result.training = TrainingState(optim, scheduler, generator)
    if saved is not None:
        restore_run(result, saved)
    start_values = {k: v.detach().clone() for k, v in guide.global_values().items()}
    run = TrainingRun(result, source, control, dtype=dtype, device=dev, progress=progress)
    run.train(meta_steps, callback)
    boundary_warnings(
        [s for s in guide.structure.global_sites if not _reported_by_model(model, s.name)],
        start_values,
        guide.global_values(),
        method,
    )
    _warn_if_prior_collapsed(model, result)
    return result


def _reported_by_model(model: Any, name: str) -> bool:
    """A TaskModel's learned prior scale has a warning of its own (see below)."""
    return isinstance(model, TaskModel) and name == "prior_scale"


def _warn_if_prior_collapsed(model: Any, result: FitResult) -> None:
    """Warn when a learned prior scale ended far below where it started: the Laplace posterior
    N(phi_hat, H^-1) is then close to a point mass."""
    if not isinstance(model, TaskModel) or not model.learn_prior_scale:
        return
    start = model.prior_scale_init
    with torch.no_grad():
        learned = model.prior_scale_of(result.guide.global_values())
    scale = learned.reshape(-1)[0] if isinstance(learned, Tensor) else torch.tensor(learned)
    if float(scale) < 0.01 * float(start):
        warnings.warn(
            f"the learned prior scale fell from {start:g} to {float(scale):.3g}: the {result.method} "
            "objective found no use for weight uncertainty, so the task posteriors are close to "
            "point masses and predictive intervals come from the noise scale alone. Fix the "
            "prior scale (learn_prior_scale=False) to keep a Laplace posterior with real width.",
            UserWarning,
            stacklevel=3,
        )
