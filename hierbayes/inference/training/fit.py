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
from hierbayes.inference.core.losses import HyperpriorSpace
from hierbayes.inference.objectives import MetaObjective
from hierbayes.inference.svi.guide import InnerObjective, StepSizeMode, TruncatedGradientGuide
from hierbayes.inference.training.boundary import boundary_sites, warn_at_boundary
from hierbayes.inference.training.checks import (
    as_task_source,
    check_arguments,
    check_dtype,
    check_empirical_bayes,
    check_inputs,
    check_query_less,
    check_targets,
    reset_param_sites,
    trainable_parameters,
)
from hierbayes.inference.training.distributed import DistributedContext, distributed_session
from hierbayes.inference.training.empirical_bayes import (
    full_batch_optimizer,
    run_full_batch,
    stochastic_convergence,
    uses_full_batch,
    warn_unconverged,
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
    step_size: float | Tensor = 0.01,
    learn_step_size: StepSizeMode = "fixed",
    first_order: bool = False,
    inner_objective: InnerObjective = "likelihood",
    inner_loss: InnerLoss = "sum",
    gradient_checkpointing: bool = False,
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
    full_batch: bool | None = None,
    grad_tolerance: float = 1e-6,
    loss_tolerance: float = 1e-12,
    hyperprior_space: HyperpriorSpace = "constrained",
    distributed: bool | None = None,
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
    gradient_checkpointing:
        Recompute each inner step in the backward pass instead of keeping its activations
        (``torch.utils.checkpoint``): second-order MAML with more inner steps in less memory,
        the same meta-gradient.
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
    full_batch:
        Minimise the objective over **all** tasks every iteration with the deterministic
        optimiser, L-BFGS with a strong-Wolfe line search, up to ``meta_steps`` iterations
        (:mod:`~hierbayes.inference.training.empirical_bayes`; ``meta_batch_size``, ``lr`` and
        ``optimizer`` are the stochastic loop's). ``None`` (default) chooses it for an evidence
        objective on a finite set of tasks without a query set (groups as tasks, e.g.
        :func:`~hierbayes.tasks.radon_tasks`) when no ``optimizer`` is given; ``True`` for any
        finite task set; ``False`` keeps Adam on batches of tasks.
    grad_tolerance, loss_tolerance:
        The convergence criterion, reported in ``FitResult.convergence``: a full-batch run stops
        once the gradient norm (over every trained parameter, unconstrained) is at most
        ``grad_tolerance`` or the loss changes by at most ``loss_tolerance`` (relative) in one
        iteration. A run that ends unconverged (a stochastic run: its loss still falling) warns.
    hyperprior_space:
        Where the globals' hyperprior is scored (type-II MAP): ``"constrained"`` (default) the
        density of each value, as Pyro's ``AutoDelta``; ``"unconstrained"`` the density of the
        unconstrained value the optimiser moves (:math:`\log\tau` for a scale), i.e. with the
        log-Jacobian :math:`\log\tau`, which keeps a group scale off its boundary at 0.
    distributed:
        Data-parallel meta-training over the ranks of a ``torch.distributed`` launch
        (``torchrun --nproc_per_node=K``): every rank draws the same meta-batch and trains on
        its share of the tasks, the loss and the gradients of every trained parameter are
        averaged over the ranks (``all_reduce``), so K ranks give the parameters one process
        would (to rounding); rank 0 alone writes ``checkpoint`` and ``metrics_log`` and shows
        progress, and a checkpoint resumes on any number of ranks. ``None`` (default): on
        when there is more than one rank (``WORLD_SIZE > 1``, or an initialised process group
        of several ranks); ``True``: the same, and a plain ``python`` run is one rank;
        ``False``: never (each rank trains a run of its own). A process group that does not
        exist is initialised (gloo on CPU, NCCL for ``device="cuda"``, which becomes
        ``cuda:LOCAL_RANK``); collectives time out after
        :data:`~hierbayes.inference.training.distributed.DEFAULT_TIMEOUT` seconds (environment
        variable ``HIERBAYES_DIST_TIMEOUT``). See
        :mod:`hierbayes.inference.training.distributed`.
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
    DistributedTrainingError
        In a distributed run, on every rank: the ranks disagree on a setting (named), a rank
        failed while setting up, or another rank stopped or timed out.
    """
    with warning_tally(), distributed_session(distributed, device) as context:
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
                gradient_checkpointing=gradient_checkpointing,
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
            empirical=dict(
                full_batch=full_batch,
                grad_tolerance=grad_tolerance,
                loss_tolerance=loss_tolerance,
                hyperprior_space=hyperprior_space,
            ),
            method_options=method_options,
            context=context,
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
    context: DistributedContext | None = None,
    empirical: dict[str, Any] | None = None,
) -> FitResult:
    empirical = check_empirical_bayes(empirical or {})
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
    saved = read_run(resume, map_location="cpu") if resume is not None else None
    dev = _resolve_device(device) if context is None else context.device
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
    check_query_less(spec.name, objective, method_options, first)
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
        objective = spec.objective(
            num_tasks=source.num_tasks,
            hyperprior_space=empirical["hyperprior_space"],
            **method_options,
        )
    elif objective.hyperprior_space != empirical["hyperprior_space"]:
        raise ValueError(
            f"the given objective scores the hyperprior in the {objective.hyperprior_space} "
            f"space but fit was asked for hyperprior_space={empirical['hyperprior_space']!r}: "
            "build the objective with the one you want and leave fit's at its default"
        )
    objective.check(guide.density)  # declared capabilities, checked before any training
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
    full_batch = uses_full_batch(
        empirical["full_batch"],
        objective,
        source,
        first,
        custom_optimizer=control.optimizer is not None,
        distributed=context is not None,
    )
    config.update(empirical, full_batch=full_batch)
    optim = (
        full_batch_optimizer(parameters)
        if full_batch
        else control.optimizer(parameters)
        if control.optimizer is not None
        else torch.optim.Adam(parameters, lr=lr)
    )
    scheduler = control.lr_scheduler(optim) if control.lr_scheduler is not None else None
    result.training = TrainingState(optim, scheduler, generator)
    if saved is not None:
        restore_run(result, saved)
    start_values = {k: v.detach().clone() for k, v in guide.global_values().items()}
    if context is not None:
        context.start(result, control, parameters)  # same settings on every rank, rank 0's values
    run_options: dict[str, Any] = dict(
        grad_tolerance=empirical["grad_tolerance"],
        loss_tolerance=empirical["loss_tolerance"],
        dtype=dtype,
        device=dev,
    )
    run = TrainingRun(
        result, source, control, dtype=dtype, device=dev, progress=progress, context=context
    )
    if full_batch:
        result.convergence = run_full_batch(
            result, source, max_steps=meta_steps, callback=callback, **run_options
        )
        if control.checkpoint is not None:
            result.save(control.checkpoint)
    else:
        run.train(meta_steps, callback)
        result.convergence = stochastic_convergence(
            result,
            source,
            optimizer="adam" if control.optimizer is None else "custom",
            query_less=not first.has_query,
            **run_options,
        )
    warn_unconverged(result.convergence, result)
    at_boundary = boundary_sites(result, source, dtype=dtype, device=dev) if full_batch else {}
    warn_at_boundary(at_boundary, result)
    boundary_warnings(
        [
            s
            for s in guide.structure.global_sites
            if not _reported_by_model(model, s.name) and s.name not in at_boundary
        ],
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
