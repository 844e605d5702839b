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

**Convergence** (:class:`Convergence`, ``FitResult.convergence``). A full-batch run stops
when :math:`\lVert\nabla\mathcal L\rVert_2 \le` ``grad_tolerance`` (the gradient with respect
to every trained parameter, in the unconstrained space the optimiser moves) or when the
relative change of the loss in one iteration,
:math:`|\mathcal L_{k-1} - \mathcal L_k| / \max(|\mathcal L_{k-1}|, |\mathcal L_k|, 1)`, is at
most ``loss_tolerance`` (SciPy's ``ftol`` rule). A stochastic (Adam) run is judged by the
trend of its loss: it is unconverged when the mean loss of its last fifth of steps lies below
that of the fifth before by more than three standard errors and more than
:data:`TREND_TOLERANCE` relatively (the loss is still falling), and, for a run on a finite
query-less task set, when the gradient norm over all tasks at the end exceeds
``grad_tolerance``. An unconverged full-batch run warns, and so does an unconverged
stochastic run of an evidence objective on a finite task set (empirical Bayes, where an
optimum exists and the full-batch optimiser is the fix); a meta-learning run over an endless
family or by a query-based objective is judged on held-out tasks, so its report is in
``FitResult.convergence`` only.

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
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pyro.distributions import constraints
from torch import Tensor

from hierbayes.errors import NumericalError, TaskDataError
from hierbayes.inference.svi.llama import LaplaceEvidenceObjective
from hierbayes.inference.svi.objectives import MetaObjective
from hierbayes.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from hierbayes.inference.training.result import FitResult

__all__ = [
    "TREND_TOLERANCE",
    "Convergence",
    "UnconvergedWarning",
    "all_tasks",
    "full_batch_optimizer",
    "positive_scalar_sites",
    "run_full_batch",
    "stochastic_convergence",
    "uses_full_batch",
    "warn_unconverged",
]

#: A stochastic run is still falling when its last fifth's mean loss is this much (relative)
#: below the fifth before, and by more than three standard errors.
TREND_TOLERANCE = 1e-3
#: The fewest steps whose loss trend a stochastic run is judged by.
_MIN_TREND_STEPS = 50


class UnconvergedWarning(UserWarning):
    """``fit`` stopped before its convergence criterion was met."""


@dataclass(frozen=True)
class Convergence:
    """How a run of :func:`~hierbayes.inference.fit` ended (``FitResult.convergence``).

    Attributes
    ----------
    converged:
        Whether the criterion was met (``False`` also when a stochastic run was too short to
        judge; ``reason`` says which).
    reason:
        Why the run stopped, in words.
    steps:
        Optimiser iterations taken (L-BFGS iterations, or meta-steps).
    optimizer:
        ``"lbfgs"`` (full batch) or ``"adam"`` (or ``"custom"`` for a user's optimiser).
    loss:
        The final loss (full batch: all tasks; stochastic: the mean of the last fifth).
    grad_norm:
        :math:`\\lVert\\nabla\\mathcal L\\rVert_2` at the end over every trained parameter
        (stochastic runs: on all tasks of a finite query-less set, else on the last batch);
        ``None`` when not computed.
    relative_change:
        Full batch: the last iteration's relative change of the loss; stochastic: the relative
        fall of the mean loss between the last two fifths of the run.
    grad_tolerance, loss_tolerance:
        The tolerances the run was judged by.
    function_evaluations:
        Objective evaluations (full batch; line-search trials included).
    """

    converged: bool
    reason: str
    steps: int
    optimizer: str
    loss: float
    grad_norm: float | None
    relative_change: float | None
    grad_tolerance: float
    loss_tolerance: float
    function_evaluations: int | None = None


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


def _grad_norm(parameters: list[Tensor]) -> float:
    total = sum(
        float(p.grad.detach().double().square().sum()) for p in parameters if p.grad is not None
    )
    return math.sqrt(total)


def _relative_change(previous: float, current: float) -> float:
    return abs(previous - current) / max(abs(previous), abs(current), 1.0)


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
    search. ``result.history`` gets the loss at the start of each iteration.

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
    batch = source.sample(source.num_tasks, generator=state.generator, dtype=dtype).to(device)
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
    converged = False
    step = len(result.history)
    loss_value = float("nan")
    grad_norm = float("nan")
    while True:
        loss = closure()
        loss_value = float(loss)
        grad_norm = _grad_norm(parameters)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise MetaTrainingDiverged(
                f"L-BFGS iteration {step}: the {result.method} objective is {loss_value} (gradient "
                f"norm {grad_norm}); the result holds the last iterate. Try dtype=torch.float64, "
                "or a hyperprior that keeps scales away from 0",
                result,
            )
        if previous is not None:
            change = _relative_change(previous, loss_value)
        if grad_norm <= grad_tolerance:
            converged, reason = True, f"gradient norm {grad_norm:.3g} <= grad_tolerance"
            break
        if change is not None and change <= loss_tolerance:
            converged = True
            reason = f"relative change of the loss {change:.3g} <= loss_tolerance"
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
        result.history.append(loss_value)
        result.wall_time = time.perf_counter() - started
        if callback is not None:
            callback(step, loss_value, result)
        fresh.append(loss)
        optimizer.step(closure)  # type: ignore[arg-type]
        fresh.clear()
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
    )


def stochastic_convergence(
    result: FitResult,
    source: Any,
    *,
    grad_tolerance: float,
    loss_tolerance: float,
    dtype: torch.dtype | None,
    device: torch.device,
    optimizer: str,
    query_less: bool,
) -> Convergence:
    """Judge a stochastic run by the trend of its loss history (and, on a finite query-less
    task set, by the gradient norm over all tasks at its end)."""
    history = result.history
    steps = len(history)
    window = steps // 5
    grad_norm: float | None = None
    change: float | None = None
    if steps < _MIN_TREND_STEPS or window < 10:
        final = history[-1] if history else float("nan")
        return Convergence(
            False,
            f"too few steps ({steps}) to judge the loss trend (at least {_MIN_TREND_STEPS})",
            steps,
            optimizer,
            final,
            None,
            None,
            grad_tolerance,
            loss_tolerance,
        )
    before, last = history[-2 * window : -window], history[-window:]
    mean_before, mean_last = statistics.fmean(before), statistics.fmean(last)
    spread = math.sqrt((statistics.variance(before) + statistics.variance(last)) / window)
    change = (mean_before - mean_last) / max(abs(mean_last), 1.0)
    falling = mean_before - mean_last > 3 * spread and change > TREND_TOLERANCE
    if query_less:  # the objective is a deterministic function of the globals: its gradient
        batch = all_tasks(source, dtype, device)
        state = result.training
        if state is None:  # pragma: no cover - fit always sets it
            raise RuntimeError("the result has no training state")
        parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
        for p in parameters:
            p.grad = None
        result.objective.meta_loss(result.guide, batch).backward()
        grad_norm = _grad_norm(parameters)
        for p in parameters:
            p.grad = None
    if falling:
        reason = (
            f"the loss is still falling: the mean of the last {window} steps is "
            f"{change:.2%} below the {window} before"
        )
        converged = False
    elif grad_norm is not None and grad_norm > grad_tolerance:
        reason = f"gradient norm over all tasks {grad_norm:.3g} > grad_tolerance"
        converged = False
    else:
        reason = "the loss has levelled off over the last two fifths of the run"
        converged = True
    return Convergence(
        converged,
        reason,
        steps,
        optimizer,
        mean_last,
        grad_norm,
        change,
        grad_tolerance,
        loss_tolerance,
    )


def warn_unconverged(convergence: Convergence, result: FitResult) -> None:
    """A :class:`UnconvergedWarning` with advice for how ``convergence``'s run ended (nothing
    for a converged run, or a stochastic run too short to judge)."""
    if convergence.converged or convergence.reason.startswith("too few steps"):
        return
    config = result.config
    if convergence.optimizer == "lbfgs":
        if "boundary" in convergence.reason:
            return  # warn_at_boundary explains it
        advice = (
            f"raise meta_steps (now {config.get('meta_steps')}), or loosen grad_tolerance / "
            "loss_tolerance; in float32 the line search stalls early, so fit in float64 "
            "(dtype=torch.float64)"
        )
    else:
        # Meta-learning over an endless family, or by a query-based objective, is judged on
        # held-out tasks, not by an optimum: its report is in result.convergence, unwarned.
        evidence = isinstance(result.objective, LaplaceEvidenceObjective)
        if not evidence or config.get("num_tasks") is None:
            return
        advice = (
            f"raise meta_steps (now {config.get('meta_steps')}) or lr (now {config.get('lr')}), "
            "or fit all tasks at once with the deterministic optimiser, full_batch=True (L-BFGS "
            "with a line search)"
        )
    warnings.warn(
        f"fit stopped before converging after {convergence.steps} {convergence.optimizer} "
        f"iterations: {convergence.reason}; the global estimates are not at the optimum of the "
        f"{result.method} objective. To fix it, {advice}. result.convergence has the details",
        UnconvergedWarning,
        stacklevel=4,
    )


def all_tasks(source: Any, dtype: torch.dtype | None, device: torch.device) -> TaskBatch:
    """Every task of a finite source, drawn with a private generator (the global random
    stream and the run's sampler are left alone)."""
    generator = torch.Generator().manual_seed(0)
    batch: TaskBatch = source.sample(source.num_tasks, generator=generator, dtype=dtype)
    return batch.to(device)
