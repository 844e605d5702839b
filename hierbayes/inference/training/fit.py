r"""``fit(model, tasks)``: meta-train a hierbayes model and return a plain result object.

Meta-training is stochastic optimisation of a meta-objective (MAML's query likelihood, or a
Laplace objective) over batches of tasks, with the truncated-gradient guide as the amortised
task posterior; or, for empirical Bayes on a finite set of groups, deterministic L-BFGS over all
of them. ``fit`` takes the fast road of the objectives
(:meth:`~hierbayes.inference.objectives.MetaObjective.meta_loss`: the pure functions of
:mod:`hierbayes.inference.core` on the guide's values); the Pyro road that ``pyro.infer.SVI``
takes gives the same loss and gradients (tested). Its settings are three frozen dataclasses
(:mod:`~hierbayes.inference.training.config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hierbayes.errors import ModelContractError
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.objectives import LaplaceEvidenceObjective, MetaObjective
from hierbayes.inference.training.boundary import (
    boundary_sites,
    warn_at_boundary,
    warn_if_prior_collapsed,
)
from hierbayes.inference.training.checks import (
    as_task_source,
    check_arguments,
    check_dtype,
    check_inputs,
    check_query_less,
    check_targets,
    reset_param_sites,
    trainable_parameters,
)
from hierbayes.inference.training.config import (
    GuideConfig,
    OptimConfig,
    RunConfig,
    config_fields,
    split_options,
)
from hierbayes.inference.training.distributed import DistributedContext
from hierbayes.inference.training.empirical_bayes import (
    full_batch_optimizer,
    run_full_batch,
    stochastic_convergence,
    uses_full_batch,
    warn_unconverged,
)
from hierbayes.inference.training.guards import boundary_warnings, warning_tally
from hierbayes.inference.training.launch import distributed_session
from hierbayes.inference.training.loop import TrainingControl, TrainingRun
from hierbayes.inference.training.methods import get_method
from hierbayes.inference.training.persistence import read_run, restore_run
from hierbayes.inference.training.prepare import (
    first_batch,
    resolve_device,
    warn_if_batch_too_large,
)
from hierbayes.inference.training.result import FitResult, MetaTrainingInterrupted, TrainingState
from hierbayes.models.task_model import TaskModel
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.source import TaskSource

__all__ = ["fit"]

#: Keywords ``fit`` routes itself (beside the config fields): the objective's hyperprior space,
#: and ``full_batch`` (``True``/``False``: ``OptimConfig(algorithm="lbfgs"/"adam")``).
_OWN_OPTIONS = ("hyperprior_space", "full_batch")
#: The evidence objective's mode search in a full-batch (L-BFGS) fit, unless given: to rounding.
FULL_BATCH_MODE_SEARCH = {"mode_tolerance": 1e-10, "mode_steps": 50}


def fit(
    model: Any,
    tasks: TaskSource | TaskBatch | Sequence[Any],
    method: str = "maml",
    *,
    guide: GuideConfig | TruncatedGradientGuide | None = None,
    optim: OptimConfig | None = None,
    run: RunConfig | None = None,
    objective: MetaObjective | str | None = None,
    **options: Any,
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
        A registered method: ``"maml"`` (default) or ``"llama"`` (see
        :func:`~hierbayes.inference.methods`).
    guide:
        A :class:`~hierbayes.inference.training.config.GuideConfig` (the inner loop), or a
        pre-built :class:`~hierbayes.inference.TruncatedGradientGuide`, which brings its own
        inner loop: then no guide option may be given (it would be ignored).
    optim:
        An :class:`~hierbayes.inference.training.config.OptimConfig`: Adam or L-BFGS (chosen
        explicitly, or ``"auto"``), its learning rate and batch size, a custom optimiser or
        schedule, clipping, the convergence tolerances.
    run:
        A :class:`~hierbayes.inference.training.config.RunConfig`: meta-steps, seed, device and
        dtype, progress, callback, checkpoints and resume, the metrics log, the inner-loop check,
        distributed training.
    objective:
        A pre-built :class:`~hierbayes.inference.objectives.MetaObjective`, or the name of a
        variant of the method (``"predictive"``, ``"evidence"``, ``"paper"`` for ``"llama"``).
    **options:
        Any field of the three configs as a keyword of its own (a shortcut: ``meta_steps=500``
        is ``run=RunConfig(meta_steps=500)``; a field given both ways is an error); the rest go
        to the method's objective (``curvature="ggn"``, ``hyperprior_space="unconstrained"``,
        ...), and a misspelled one is an error that names the close match.

    Notes
    -----
    ``fit`` trains ``model`` and the guide in place (fit a fresh model for each run you want
    to keep), moves the model to ``device``/``dtype``, and seeds torch's global generator with
    ``seed``. Warnings are issued when they happen; each distinct one once, and once more with
    its count at the end of the run if it repeated.

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
    own = {k: options.pop(k) for k in _OWN_OPTIONS if k in options}
    prebuilt: TruncatedGradientGuide | None = None
    if isinstance(guide, TruncatedGradientGuide):
        prebuilt, guide = guide, None
        named = sorted(
            k for k, cls in config_fields().items() if cls is GuideConfig and k in options
        )
        if named:
            raise TypeError(
                f"fit got a pre-built guide and the guide options {named}: a built guide keeps "
                "its own inner loop, so they would be ignored. Build the guide with them, or "
                "pass guide=GuideConfig(...) instead of the guide"
            )
    if "full_batch" in own:
        full = own.pop("full_batch")
        if full is not None:
            if optim is not None or "algorithm" in options:
                raise TypeError("give full_batch= or the optimiser's algorithm, not both")
            if full not in (True, False):
                raise ValueError(f"full_batch must be None, True or False; got {full!r}")
            options["algorithm"] = "lbfgs" if full else "adam"
    guide_config, optim_config, run_config, method_options = split_options(
        options, guide, optim, run
    )
    if prebuilt is not None:
        guide_config = GuideConfig.of(prebuilt)
    with warning_tally(), distributed_session(run_config.distributed, run_config.device) as context:
        return _fit(
            model,
            tasks,
            method,
            guide_config,
            optim_config,
            run_config,
            prebuilt=prebuilt,
            objective=objective,
            hyperprior_space=own.get("hyperprior_space"),
            method_options=method_options,
            context=context,
        )


def _fit(
    model: Any,
    tasks: Any,
    method: str,
    guide_config: GuideConfig,
    optim: OptimConfig,
    run: RunConfig,
    *,
    prebuilt: TruncatedGradientGuide | None,
    objective: MetaObjective | str | None,
    hyperprior_space: str | None,
    method_options: dict[str, Any],
    context: DistributedContext | None = None,
) -> FitResult:
    spec = get_method(method)
    if isinstance(objective, str):
        method_options["objective"] = objective
        objective = None
    control = TrainingControl(
        optimizer=optim.optimizer,
        lr_scheduler=optim.lr_scheduler,
        clip_grad_norm=optim.clip_grad_norm,
        checkpoint=None if run.checkpoint is None else Path(run.checkpoint),
        checkpoint_every=run.checkpoint_every,
        metrics_log=None if run.metrics_log is None else Path(run.metrics_log),
        log_every=run.log_every,
        check_every=run.check_every,
    )
    check_arguments(
        spec,
        run.meta_steps,
        optim.meta_batch_size,
        optim.lr,
        guide_config.options(),
        control,
        method_options,
        fit_options=(*config_fields(), *_OWN_OPTIONS),
    )
    if not callable(model):
        raise ModelContractError(
            f"fit needs a model: a Pyro program model(x, y=None) (or a hierbayes TaskModel); "
            f"got {type(model).__name__}"
        )
    saved = read_run(run.resume, map_location="cpu") if run.resume is not None else None
    dev = resolve_device(run.device) if context is None else context.device
    source = as_task_source(tasks)
    torch.manual_seed(run.seed)
    generator = torch.Generator().manual_seed(run.seed)
    if isinstance(model, torch.nn.Module):
        model.to(device=dev, dtype=run.dtype)
    first = first_batch(source, optim, run, dev, generator)
    check_query_less(spec.name, objective, method_options, first)
    check_dtype(model, first, run.dtype)
    check_inputs(model, first)
    if not isinstance(model, torch.nn.Module) and prebuilt is None:
        reset_param_sites(model, first)
    guide = (
        prebuilt
        if prebuilt is not None
        else TruncatedGradientGuide(model, first, **guide_config.options())
    )
    guide.to(device=dev, dtype=run.dtype)
    check_targets(guide, first)
    space = hyperprior_space
    given = objective is not None
    if objective is None:
        objective = spec.objective(
            num_tasks=source.num_tasks, hyperprior_space=space or "constrained", **method_options
        )
    elif space is not None and space != objective.hyperprior_space:
        raise ValueError(
            f"the given objective scores the hyperprior in the {objective.hyperprior_space!r} "
            f"space, but fit got hyperprior_space={space!r}: build the objective with the one "
            "you want"
        )
    full_batch = uses_full_batch(
        optim.full_batch,
        objective,
        source,
        first,
        custom_optimizer=optim.optimizer is not None,
        distributed=context is not None,
    )
    if full_batch and not given and isinstance(objective, LaplaceEvidenceObjective):
        # a deterministic optimiser needs a smooth objective: each task's mode found to
        # rounding, not to a tolerance that makes the evidence piecewise in the globals
        for key, value in FULL_BATCH_MODE_SEARCH.items():
            method_options.setdefault(key, value)
        objective = spec.objective(
            num_tasks=source.num_tasks, hyperprior_space=space or "constrained", **method_options
        )
    objective.check(guide.density)  # declared capabilities, checked before any training
    if not full_batch:  # a full-batch run takes every task anyway
        warn_if_batch_too_large(source, tasks, optim)
    config = dict(
        method=method,
        meta_steps=run.meta_steps,
        meta_batch_size=optim.meta_batch_size,
        **guide_config.options(),
        lr=optim.lr,
        seed=run.seed,
        device=str(dev),
        dtype=run.dtype,
        num_tasks=source.num_tasks,
        **method_options,
        full_batch=full_batch,
        grad_tolerance=optim.grad_tolerance,
        loss_tolerance=optim.loss_tolerance,
        hyperprior_space=objective.hyperprior_space,
    )
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
    optimizer = (
        full_batch_optimizer(parameters)
        if full_batch
        else optim.optimizer(parameters)
        if optim.optimizer is not None
        else torch.optim.Adam(parameters, lr=optim.lr)
    )
    scheduler = optim.lr_scheduler(optimizer) if optim.lr_scheduler is not None else None
    result.training = TrainingState(optimizer, scheduler, generator)
    if saved is not None:
        restore_run(result, saved)
    start_values = {k: v.detach().clone() for k, v in guide.global_values().items()}
    if context is not None:
        context.start(result, control, parameters)  # same settings on every rank, rank 0's values

    training = TrainingRun(
        result, source, control, dtype=run.dtype, device=dev, progress=run.progress, context=context
    )
    try:
        if full_batch:
            result.convergence = run_full_batch(
                result,
                source,
                max_steps=run.meta_steps,
                callback=run.callback,
                grad_tolerance=optim.grad_tolerance,
                loss_tolerance=optim.loss_tolerance,
                dtype=run.dtype,
                device=dev,
            )
            if control.checkpoint is not None:
                result.save(control.checkpoint)
        else:
            training.train(run.meta_steps, run.callback)
            result.convergence = stochastic_convergence(
                result,
                source,
                optimizer="adam" if optim.optimizer is None else "custom",
                query_less=not first.has_query,
                grad_tolerance=optim.grad_tolerance,
                loss_tolerance=optim.loss_tolerance,
                dtype=run.dtype,
                device=dev,
            )
        at_boundary = (
            boundary_sites(result, source, dtype=run.dtype, device=dev) if full_batch else {}
        )
        if not at_boundary:  # a scale at its boundary is why such a run stops: that warning says it
            warn_unconverged(result.convergence, result)
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
        warn_if_prior_collapsed(model, result)
    except KeyboardInterrupt as err:
        if isinstance(err, MetaTrainingInterrupted):
            raise
        # between steps (an L-BFGS iteration, or the report after the last step): the run is
        # at a step boundary (the stochastic loop saves an interrupted step itself)
        written = control.checkpoint if context is None or context.is_main else None
        if written is not None:
            result.save(written)
        raise MetaTrainingInterrupted(
            f"meta-training was interrupted after {len(result.history)} meta-steps"
            + (f"; the run is saved at {written}" if written is not None else "")
            + " (the exception's .result holds it).",
            result,
        ) from err
    return result


def _reported_by_model(model: Any, name: str) -> bool:
    """A TaskModel's learned prior scale has a warning of its own (warn_if_prior_collapsed)."""
    return isinstance(model, TaskModel) and name == "prior_scale"
