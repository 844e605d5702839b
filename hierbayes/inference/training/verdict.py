r"""The verdict on a run of ``fit``: a stochastic run judged by its loss trend (and, for a finite
query-less task set, by its gradient), and the warning when a run did not converge, with advice
that fits how it stopped (see :mod:`~hierbayes.inference.training.convergence`)."""

from __future__ import annotations

import math
import statistics
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hierbayes.errors import UnconvergedWarning
from hierbayes.inference.objectives import LaplaceEvidenceObjective, LaplaceObjective
from hierbayes.inference.training.convergence import (
    MIN_TREND_STEPS,
    TREND_TOLERANCE,
    Convergence,
    all_tasks,
    gradient_norm,
)

if TYPE_CHECKING:
    from hierbayes.inference.training.result import FitResult

__all__ = ["stochastic_convergence", "warn_unconverged"]


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
    if steps < MIN_TREND_STEPS or window < 10:
        final = history[-1] if history else float("nan")
        return Convergence(
            False,
            f"too few steps ({steps}) to judge the loss trend (at least {MIN_TREND_STEPS})",
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
