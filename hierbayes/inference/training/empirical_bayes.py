r"""Empirical Bayes that converges: full-batch L-BFGS, a convergence report, boundary checks.

When the task set is finite and fits in memory (groups as tasks: counties, schools), the
type-II MAP objective of ``fit(..., method="llama", objective="evidence")``,

.. math::

    \mathcal L(\theta) = -\frac1J\Big[\sum_{j=1}^{J}\log\hat p(\mathcal D_j\mid\theta)
        + \log p(\theta)\Big],

is a deterministic function of the global latents :math:`\theta` (exact for linear-Gaussian
groups), and a deterministic quasi-Newton method reaches its optimum in tens of iterations
where Adam on batches of tasks wanders for thousands: :func:`run_full_batch` takes
``torch.optim.LBFGS`` with a strong-Wolfe line search (Nocedal & Wright 2006, §7.2 and
§3.1), all tasks every iteration, on the unconstrained values of the globals.

**Convergence** (:class:`~hierbayes.inference.training.convergence.Convergence`,
``FitResult.convergence``; :mod:`~hierbayes.inference.training.convergence`). A full-batch run
is converged when :math:`\lVert\nabla\mathcal L\rVert_2 \le` ``grad_tolerance``, and only
then. It also stops when the relative change of the loss in an iteration is at most
``loss_tolerance`` (or is rounding only: the line search made no progress), but with the
gradient above its tolerance that is reported as a stall (``converged=False``,
``stalled=True``) and warned about, with advice for the cause: a loose ``loss_tolerance``, or
an objective that is not smooth at the working precision (float32, a Monte Carlo curvature, a
mode search stopped at a tolerance).

**The boundary** (:func:`boundary_sites`). A group scale :math:`\tau` whose marginal
likelihood peaks at :math:`\tau = 0` (eight schools) has no interior optimum; with the
hyperprior scored in the constrained space (as ``AutoDelta``) its unconstrained value
:math:`\log\tau` runs off towards :math:`-\infty` while the gradient vanishes. After a
deterministic fit each positive scalar global is tested directly: if the loss at
:math:`\hat\tau/10` is no higher than at :math:`\hat\tau`, the objective still falls towards
the boundary and ``fit`` warns, naming the cause and the fixes.

References
----------
1. Nocedal & Wright (2006). *Numerical Optimization*, 2nd ed., §3.1, §7.2.
2. Chung, Rabe-Hesketh, Dorie, Gelman & Liu (2013). A nondegenerate penalized likelihood
   estimator for variance parameters in multilevel models. *Psychometrika* 78(4).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pyro.distributions import constraints
from torch import Tensor

from hierbayes.errors import NumericalError, TaskDataError
from hierbayes.inference.objectives import LaplaceEvidenceObjective, MetaObjective
from hierbayes.inference.training.convergence import (
    TREND_TOLERANCE,
    Convergence,
    UnconvergedWarning,
    all_tasks,
    gradient_norm,
    relative_change,
    stall_reason,
)
from hierbayes.inference.training.interrupts import InterruptGuard
from hierbayes.inference.training.verdict import stochastic_convergence, warn_unconverged
from hierbayes.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from hierbayes.inference.training.result import FitResult

# The report and the stochastic path's judgement live in convergence.py, re-exported here.
__all__ = [
    "TREND_TOLERANCE",
    "Convergence",
    "UnconvergedWarning",
    "all_tasks",
    "full_batch_optimizer",
    "gradient_norm",
    "positive_scalar_sites",
    "run_full_batch",
    "stochastic_convergence",
    "uses_full_batch",
    "warn_unconverged",
]


def uses_full_batch(
    full_batch: bool | None,
    objective: MetaObjective,
    source: Any,
    first: TaskBatch,
    *,
    custom_optimizer: bool,
    distributed: bool = False,
) -> bool:
    """Whether ``fit`` runs the full-batch L-BFGS path.

    ``full_batch=None`` (the default) chooses it for an evidence objective on a finite task set
    without a query set (groups as tasks) when no optimiser was given; ``True`` asks for it
    (any objective on a finite task set); ``False`` keeps the stochastic loop.
    """
    finite = source.num_tasks is not None
    if full_batch and distributed:
        raise ValueError(
            "full_batch=True is a single-process optimiser; a distributed run takes the "
            "stochastic loop (full_batch=False)"
        )
    if full_batch is None:
        return (
            not distributed
            and finite
            and not first.has_query
            and isinstance(objective, LaplaceEvidenceObjective)
            and not custom_optimizer
        )
    if full_batch and not finite:
        raise TaskDataError(
            "full_batch=True needs a finite task set (a TaskCollection, a list of tasks or one "
            f"TaskBatch); {type(source).__name__} draws tasks without end. Use the stochastic "
            "loop (full_batch=False) with meta_batch_size tasks a step"
        )
    if full_batch and custom_optimizer:
        raise ValueError(
            "full_batch=True runs L-BFGS with a strong-Wolfe line search; it takes no "
            "optimizer=. Pass one or the other"
        )
    return bool(full_batch)


def full_batch_optimizer(parameters: list[Tensor]) -> torch.optim.LBFGS:
    """L-BFGS with a strong-Wolfe line search, one iteration a ``step`` (the run's own
    criterion decides when to stop, so torch's tolerances are off)."""
    return torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=1,
        max_eval=26,  # one iteration: its evaluation and up to 25 line-search trials
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )


def positive_scalar_sites(result: FitResult) -> list[str]:
    names = []
    for site in result.guide.structure.global_sites:
        support = site.support
        base = support.base_constraint if isinstance(support, constraints.independent) else support
        if not isinstance(base, (constraints.greater_than, constraints.greater_than_eq)):
            continue
        if float(base.lower_bound) == 0.0 and math.prod(site.shape) == 1:
            names.append(site.name)
    return names


def run_full_batch(
    result: FitResult,
    source: Any,
    *,
    max_steps: int,
    grad_tolerance: float,
    loss_tolerance: float,
    dtype: torch.dtype | None,
    device: torch.device,
    callback: Callable[[int, float, FitResult], None] | None = None,
) -> Convergence:
    r"""Minimise ``result``'s objective over all of ``source``'s tasks with L-BFGS.

    Each iteration evaluates the objective and its gradient on every task (one batch, padded
    and masked), checks the criterion, then takes one L-BFGS step with a strong-Wolfe line
    search. ``result.history`` gets the loss at the start of each iteration. The run is
    converged when the gradient norm is at most ``grad_tolerance``; it stops unconverged
    (``stalled``) when the loss changed by at most ``loss_tolerance`` (relative) in an
    iteration first, at a positive scalar global falling to its boundary, or after
    ``max_steps`` iterations.

    Raises
    ------
    MetaTrainingDiverged
        If the loss or its gradient is not finite at an iterate.
    """
    from hierbayes.inference.training.result import MetaTrainingDiverged

    state = result.training
    if state is None:  # pragma: no cover - fit always sets it
        raise RuntimeError("the result has no training state")
    optimizer = state.optimizer
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    # every task, in one fixed order (not a draw of the run's sampler: a resumed run would
    # draw another order, and sums in another order round differently)
    batch = all_tasks(source, dtype, device)
    guide, objective = result.guide, result.objective
    evaluations = 0
    fresh: list[Tensor] = []  # the loss just evaluated at the current point, gradients in .grad

    def closure() -> Tensor:
        nonlocal evaluations
        if fresh:
            return fresh.pop()
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = objective.meta_loss(guide, batch)
        except NumericalError as err:
            raise MetaTrainingDiverged(
                f"L-BFGS iteration {len(result.history)}: {err}", result
            ) from err
        evaluations += 1
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach()

    started = time.perf_counter() - result.wall_time
    sites = positive_scalar_sites(result)
    tiny = (
        torch.finfo(
            batch.support_y.dtype
            if batch.support_y.is_floating_point()
            else torch.get_default_dtype()
        ).tiny
        ** 0.25
    )
    previous = result.history[-1] if result.history else None
    change: float | None = None
    reason = f"the most iterations, meta_steps={max_steps}, were taken"
    converged = stalled = False
    step = len(result.history)
    loss_value = float("nan")
    grad_norm = float("nan")
    with InterruptGuard() as guard:
        while True:
            loss = closure()
            guard.poll()  # a Ctrl-C during the evaluation stops before the next iteration
            loss_value = float(loss)
            grad_norm = gradient_norm(parameters)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise MetaTrainingDiverged(
                    f"L-BFGS iteration {step}: the {result.method} objective is {loss_value} (gradient "
                    f"norm {grad_norm}); the result holds the last iterate. Try dtype=torch.float64, "
                    "or a hyperprior that keeps scales away from 0",
                    result,
                )
            if previous is not None:
                change = relative_change(previous, loss_value)
            if grad_norm <= grad_tolerance:  # converged: the gradient test, and only it
                converged = True
                reason = f"gradient norm {grad_norm:.3g} <= grad_tolerance {grad_tolerance:.3g}"
                break
            if change is not None and change <= loss_tolerance:  # the loss stopped changing first
                stalled = True
                reason = stall_reason(change, loss_tolerance, grad_norm, grad_tolerance, loss.dtype)
                break
            values = guide.global_values()
            low = [n for n in sites if float(values[n].detach().reshape(())) < tiny]
            if low:
                reason = (
                    f"{low[0]!r} fell below {tiny:.3g}, towards its boundary at 0 (the objective "
                    "keeps falling there)"
                )
                break
            if step >= max_steps:
                break
            fresh.append(loss)
            with guard.critical():  # an L-BFGS iteration is taken whole or not at all
                optimizer.step(closure)  # type: ignore[arg-type]
                fresh.clear()
                result.history.append(loss_value)
                result.wall_time = time.perf_counter() - started
            if callback is not None:
                callback(step, loss_value, result)
            previous = loss_value
            step += 1
    result.wall_time = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    return Convergence(
        converged=converged,
        reason=reason,
        steps=step,
        optimizer="lbfgs",
        loss=loss_value,
        grad_norm=grad_norm,
        relative_change=change,
        grad_tolerance=grad_tolerance,
        loss_tolerance=loss_tolerance,
        function_evaluations=evaluations,
        stalled=stalled,
    )
