r"""How a run of ``fit`` ended: the convergence report, and the warning when it did not converge.

**Converged means the gradient test passed.** A full-batch (L-BFGS) run is converged when
:math:`\lVert\nabla\mathcal L\rVert_2 \le` ``grad_tolerance`` (the gradient with respect to
every trained parameter, in the unconstrained space the optimiser moves), and only then. It
also stops when the relative change of the loss in one iteration,
:math:`|\mathcal L_{k-1} - \mathcal L_k| / \max(|\mathcal L_{k-1}|, |\mathcal L_k|, 1)`, is at
most ``loss_tolerance`` (SciPy's ``ftol`` rule), but with the gradient above its tolerance
that is a **stall**, not convergence (``converged=False``, ``stalled=True``): either the
tolerance was loose, or (a change of exactly 0) the line search could not lower the loss,
which happens when the objective is not a smooth function of the globals at the working
precision: float32 rounding, a Monte Carlo curvature whose draws jump, a mode search that
stops at a tolerance and so makes the Laplace evidence piecewise. A deterministic optimiser
cannot tell a stall from an optimum by the loss alone; the gradient can.

A stochastic (Adam) run is judged by the trend of its loss: it is unconverged when the mean
loss of its last fifth of steps lies below that of the fifth before by more than three
standard errors and more than :data:`TREND_TOLERANCE` relatively (the loss is still falling).
On a finite query-less task set, where the objective is a deterministic function of the
globals, the gradient test applies too: a levelled-off loss with the gradient over all tasks
above ``grad_tolerance`` is a stall (Adam's noise floor), not convergence. Elsewhere (an
endless family of tasks, or a query-based objective) the levelled-off loss is the only test,
and the report says so.

An unconverged full-batch run warns (:class:`~hierbayes.errors.UnconvergedWarning`) with
advice that fits how it stopped; so does an unconverged stochastic run of an evidence
objective on a finite task set (empirical Bayes, where an optimum exists and the full-batch
optimiser is the fix). A meta-learning run is judged on held-out tasks, so its report is in
``FitResult.convergence`` only.

References: Nocedal & Wright (2006), *Numerical Optimization*, 2nd ed., §3.1 and §7.2.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hierbayes.errors import UnconvergedWarning
from hierbayes.inference.objectives import LaplaceEvidenceObjective, LaplaceObjective
from hierbayes.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from hierbayes.inference.training.result import FitResult

__all__ = [
    "ROUNDING_STEPS",
    "TREND_TOLERANCE",
    "Convergence",
    "UnconvergedWarning",
    "all_tasks",
    "gradient_norm",
    "made_no_progress",
    "relative_change",
    "stall_reason",
    "stochastic_convergence",
    "warn_unconverged",
]

#: A stochastic run is still falling when its last fifth's mean loss is this much (relative)
#: below the fifth before, and by more than three standard errors.
TREND_TOLERANCE = 1e-3
#: The fewest steps whose loss trend a stochastic run is judged by.
_MIN_TREND_STEPS = 50
#: A relative change of the loss within this many machine epsilons is rounding: no progress.
ROUNDING_STEPS = 100


@dataclass(frozen=True)
class Convergence:
    r"""How a run of :func:`~hierbayes.inference.fit` ended (``FitResult.convergence``).

    Attributes
    ----------
    converged:
        Whether the gradient test passed (:math:`\lVert\nabla\mathcal L\rVert_2 \le`
        ``grad_tolerance``); for a stochastic run without a gradient test (an endless task
        family, a query-based objective), whether its loss levelled off. ``False`` also when a
        stochastic run was too short to judge; ``reason`` says which.
    reason:
        Why the run stopped, in words.
    steps:
        Optimiser iterations taken (L-BFGS iterations, or meta-steps).
    optimizer:
        ``"lbfgs"`` (full batch) or ``"adam"`` (or ``"custom"`` for a user's optimiser).
    loss:
        The final loss (full batch: all tasks; stochastic: the mean of the last fifth).
    grad_norm:
        :math:`\lVert\nabla\mathcal L\rVert_2` at the end over every trained parameter
        (stochastic runs: on all tasks of a finite query-less set); ``None`` when not computed.
    relative_change:
        Full batch: the last iteration's relative change of the loss; stochastic: the relative
        fall of the mean loss between the last two fifths of the run.
    grad_tolerance, loss_tolerance:
        The tolerances the run was judged by.
    function_evaluations:
        Objective evaluations (full batch; line-search trials included).
    stalled:
        The loss stopped changing (by at most ``loss_tolerance``, or not at all: the line
        search made no progress; a stochastic run's loss levelled off) while the gradient norm
        was above ``grad_tolerance``. Never true of a converged run.
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
    stalled: bool = False


def gradient_norm(parameters: list[Tensor]) -> float:
    """The 2-norm of the ``.grad`` of ``parameters`` together (in float64)."""
    total = sum(
        float(p.grad.detach().double().square().sum()) for p in parameters if p.grad is not None
    )
    return math.sqrt(total)


def relative_change(previous: float, current: float) -> float:
    """:math:`|a - b| / \\max(|a|, |b|, 1)`."""
    return abs(previous - current) / max(abs(previous), abs(current), 1.0)


def made_no_progress(change: float, dtype: torch.dtype) -> bool:
    """Whether a relative change of the loss is at the level of rounding in ``dtype`` (at most
    :data:`ROUNDING_STEPS` machine epsilons): the line search did not lower the loss."""
    return change <= ROUNDING_STEPS * torch.finfo(dtype).eps


def stall_reason(
    change: float,
    loss_tolerance: float,
    grad_norm: float,
    grad_tolerance: float,
    dtype: torch.dtype,
) -> str:
    """Why a full-batch run that stopped on the loss is not converged, in words."""
    gradient = f"while the gradient norm is {grad_norm:.3g} > grad_tolerance {grad_tolerance:.3g}"
    if made_no_progress(change, dtype):
        return (
            f"the line search made no progress: the loss changed by {change:.3g} (relative, "
            f"at the level of {dtype} rounding) {gradient}"
        )
    return (
        f"the loss stopped changing: its relative change {change:.3g} <= loss_tolerance "
        f"{loss_tolerance:.3g} {gradient}"
    )


def all_tasks(source: Any, dtype: torch.dtype | None, device: torch.device) -> TaskBatch:
    """Every task of a finite source, drawn with a private generator (the global random
    stream and the run's sampler are left alone)."""
    generator = torch.Generator().manual_seed(0)
    batch: TaskBatch = source.sample(source.num_tasks, generator=generator, dtype=dtype)
    return batch.to(device)


def _trained(result: FitResult) -> list[Tensor]:
    state = result.training
    if state is None:  # pragma: no cover - fit always sets it
        raise RuntimeError("the result has no training state")
    return [p for group in state.optimizer.param_groups for p in group["params"]]


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
    """Judge a stochastic run by the trend of its loss history and, on a finite query-less
    task set, by the gradient norm over all tasks at its end (see the module docstring)."""
    history = result.history
    steps = len(history)
    window = steps // 5
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
    grad_norm: float | None = None
    if query_less:  # the objective is a deterministic function of the globals: its gradient
        batch = all_tasks(source, dtype, device)
        parameters = _trained(result)
        for p in parameters:
            p.grad = None
        result.objective.meta_loss(result.guide, batch).backward()
        grad_norm = gradient_norm(parameters)
        for p in parameters:
            p.grad = None
    converged = stalled = False
    if falling:
        reason = (
            f"the loss is still falling: the mean of the last {window} steps is "
            f"{change:.2%} below the {window} before"
        )
    elif grad_norm is not None and grad_norm > grad_tolerance:
        stalled = True
        reason = (
            f"the loss has levelled off but the gradient norm over all tasks is {grad_norm:.3g} "
            f"> grad_tolerance {grad_tolerance:.3g}"
        )
    elif grad_norm is not None:
        converged = True
        reason = (
            f"gradient norm over all tasks {grad_norm:.3g} <= grad_tolerance "
            f"{grad_tolerance:.3g}, and the loss has levelled off"
        )
    else:
        converged = True
        reason = (
            "the loss has levelled off over the last two fifths of the run (no gradient test: "
            "the objective of a stochastic run over sampled tasks has no exact gradient)"
        )
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
        stalled=stalled,
    )


def _stall_advice(convergence: Convergence, result: FitResult) -> str:
    """Advice for a full-batch run whose loss stopped changing above the gradient tolerance."""
    tolerance = f"grad_tolerance (now {convergence.grad_tolerance:.3g})"
    parameters = _trained(result)
    dtype = parameters[0].dtype if parameters else torch.get_default_dtype()
    if not convergence.reason.startswith("the line search made no progress"):
        # it stopped on a loose loss_tolerance
        return (
            f"lower loss_tolerance (now {convergence.loss_tolerance:.3g}), or, if the gradient "
            f"cannot fall further at this precision, loosen {tolerance}"
        )
    # no progress at all: the loss cannot be lowered at the working precision
    fixes = []
    if dtype != torch.float64:
        fixes.append("float32 rounding: fit in float64 (dtype=torch.float64)")
    objective = result.objective
    if isinstance(objective, LaplaceEvidenceObjective) and objective.mode_tolerance > 0:
        fixes.append(
            "each task's mode search stops at a tolerance, which makes the evidence piecewise "
            f"in the globals: run it to the end (mode_tolerance=0, now "
            f"{objective.mode_tolerance:g}; mode_steps, now {objective.mode_steps}, enough)"
        )
    if isinstance(objective, LaplaceObjective):
        curvature = objective.curvature_for(result.guide.density)
        if curvature in ("ggn", "diag"):  # a plain program's: from its observation sites
            fixes.append(
                f"curvature={curvature!r} is Monte Carlo for an observation family without an "
                "exact Fisher (hierbayes.inference.curvature.families lists those with one), "
                "whose draws jump as the globals move: use curvature='full'"
            )
    fixes.append(
        "the gradient is at the objective's rounding floor (a line search on the loss cannot "
        f"take it much below the square root of machine epsilon): loosen {tolerance}"
    )
    return (
        "find what keeps the loss from falling along a descent direction; the possible causes "
        "and their fixes: " + "; ".join(fixes)
    )


def warn_unconverged(convergence: Convergence, result: FitResult) -> None:
    """A :class:`~hierbayes.errors.UnconvergedWarning` with advice for how ``convergence``'s
    run ended (nothing for a converged run, or a stochastic run too short to judge)."""
    if convergence.converged or convergence.reason.startswith("too few steps"):
        return
    config = result.config
    if convergence.optimizer == "lbfgs":
        if "boundary" in convergence.reason:
            return  # warn_at_boundary explains it
        if convergence.stalled:
            advice = _stall_advice(convergence, result)
        else:
            advice = (
                f"raise meta_steps (now {config.get('meta_steps')}), or loosen grad_tolerance "
                f"(now {convergence.grad_tolerance:.3g}); in float32 the line search stalls early, "
                "so fit in float64 (dtype=torch.float64)"
            )
    else:
        # Meta-learning over an endless family, or by a query-based objective, is judged on
        # held-out tasks, not by an optimum: its report is in result.convergence, unwarned.
        evidence = isinstance(result.objective, LaplaceEvidenceObjective)
        if not evidence or config.get("num_tasks") is None:
            return
        full_batch = (
            "fit all tasks at once with the deterministic optimiser, full_batch=True (L-BFGS "
            "with a line search)"
        )
        if convergence.stalled:  # Adam's fixed steps keep it from settling on the optimum
            advice = (
                f"{full_batch}, or lower lr (now {config.get('lr')}) as the run goes "
                "(lr_scheduler=)"
            )
        else:
            advice = (
                f"raise meta_steps (now {config.get('meta_steps')}) or lr (now "
                f"{config.get('lr')}), or {full_batch}"
            )
    warnings.warn(
        f"fit stopped before converging after {convergence.steps} {convergence.optimizer} "
        f"iterations: {convergence.reason}; the global estimates are not at the optimum of the "
        f"{result.method} objective. To fix it, {advice}. result.convergence has the details",
        UnconvergedWarning,
        stacklevel=4,
    )
