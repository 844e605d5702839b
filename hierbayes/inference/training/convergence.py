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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hierbayes.errors import UnconvergedWarning
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "MIN_TREND_STEPS",
    "ROUNDING_STEPS",
    "TREND_TOLERANCE",
    "Convergence",
    "UnconvergedWarning",
    "all_tasks",
    "gradient_norm",
    "made_no_progress",
    "relative_change",
    "stall_reason",
]

#: A stochastic run is still falling when its last fifth's mean loss is this much (relative)
#: below the fifth before, and by more than three standard errors.
TREND_TOLERANCE = 1e-3
#: The fewest steps whose loss trend a stochastic run is judged by.
MIN_TREND_STEPS = 50
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
