r"""Numerical guards of meta-training: warnings once with a count, and errors before garbage.

* :func:`warning_tally` issues each distinct warning of a run when it first happens, through
  the caller's filters, and each repeated one once more with how often it fired when the run
  ends or raises (a warning repeated at every meta-step says nothing new);
* :func:`check_inner_loop` compares each task's support log likelihood before and after the
  inner loop: a step size too large for the model raises it on most tasks (a warning naming
  ``step_size``), or by orders of magnitude (an error: training on would fit garbage);
* :func:`check_jump` stops a run whose objective jumps by orders of magnitude between steps
  (extreme parameter values, e.g. a scale at 1e-20);
* :func:`boundary_warnings` names every positive global latent that ended near its boundary
  at zero, and why that happens (the marginal likelihood may peak there).
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from pyro.distributions import constraints
from torch import Tensor

from hierbayes.errors import NumericalError
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "InnerLoopWarning",
    "WarningTally",
    "boundary_warnings",
    "check_inner_loop",
    "check_jump",
    "warning_tally",
]


class InnerLoopWarning(UserWarning):
    """The inner loop made the support fit worse: its step size is too large for the model."""


#: Numbers in a warning's text (counts, values): warnings that differ only in them are one.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\b(?:nan|inf)\b")


@dataclass
class _Seen:
    """A distinct warning: its first message, where it was raised, and how often it fired."""

    message: str
    filename: str
    lineno: int
    module: str | None
    count: int = 0


class WarningTally:
    """Distinct warnings (by category and message, numbers aside) with how often each fired;
    the first message of each, and where it was raised, are kept."""

    def __init__(self) -> None:
        self.seen: dict[tuple[type[Warning], str], _Seen] = {}

    def add(
        self, message: Warning | str, category: type[Warning], filename: str = "", lineno: int = 0
    ) -> _Seen | None:
        """Count one warning; its record when it is the first of its kind, else ``None``."""
        text = str(message)
        key = (category, _NUMBER.sub("#", text))
        seen = self.seen.get(key)
        if seen is not None:
            seen.count += 1
            return None
        seen = self.seen[key] = _Seen(text, filename, lineno, _module_of(filename), count=1)
        return seen

    @property
    def counts(self) -> dict[tuple[type[Warning], str], int]:
        """How often each distinct warning fired."""
        return {key: seen.count for key, seen in self.seen.items()}

    def repeated(self) -> list[tuple[type[Warning], str, int]]:
        """``(category, first message, count)`` of each warning that fired more than once."""
        return [(key[0], s.message, s.count) for key, s in self.seen.items() if s.count > 1]

    def issue_counts(self) -> None:
        """Issue, for each warning that fired more than once, one more with its count, where
        the first was raised (so a filter on its module or line treats it alike)."""
        for (category, _), seen in self.seen.items():
            if seen.count > 1:
                warnings.warn_explicit(
                    f"{seen.message} [{seen.count} times in this run; the first was shown when "
                    "it happened]",
                    category,
                    seen.filename,
                    seen.lineno,
                    module=seen.module,
                    registry={},
                )


def _module_of(filename: str) -> str | None:
    """The name of the imported module whose file is ``filename`` (what a filter's ``module``
    matches, as for the warning where it was raised); ``None`` when there is none."""
    if not filename:
        return None
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return None


def _reissue_through(
    filters: list[Any],
    show: Any,
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    module: str | None,
) -> None:
    """Issue a warning at its own location (file, line and module) through the caller's filters
    and display hook (``error`` raises it here and now; ``ignore`` drops it; pytest's recorder
    records it)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, text, kind, pattern, line in reversed(filters):
            warnings.filterwarnings(
                action,
                message=_pattern(text),
                category=kind,
                module=_pattern(pattern),
                lineno=line,
            )
        warnings.showwarning = show
        warnings.warn_explicit(message, category, filename, lineno, module=module, registry={})


def _pattern(value: Any) -> str:
    """A filter's message or module: a compiled pattern, a string, or ``None``."""
    if value is None:
        return ""
    return str(getattr(value, "pattern", value))


@contextmanager
def warning_tally() -> Iterator[WarningTally]:
    """Issue each distinct warning raised inside **when it happens**, through the caller's own
    filters and where it was raised (so an ``error`` filter stops the run at that moment, and
    nothing waits for the end of the run); count the repeats, and on leaving (normally or by an
    exception) say once for each repeated warning how often it fired."""
    tally = WarningTally()
    outer_filters = list(warnings.filters)
    outer_show = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        first = tally.add(message, category, filename, lineno)
        if first is not None:
            _reissue_through(
                outer_filters, outer_show, message, category, filename, lineno, first.module
            )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield tally
    finally:  # with the caller's filters again, whether the run ended or raised
        tally.issue_counts()


#: How many times worse (in support negative log likelihood) adaptation may leave a task
#: before a run is stopped rather than warned about.
DIVERGENCE_FACTOR = 1e6


def check_inner_loop(guide: TruncatedGradientGuide, batch: TaskBatch, step: int) -> None:
    r"""Compare :math:`-\log p(y^s_j\mid\phi)` at the inner loop's start and at :math:`\hat\phi_j`.

    Warns (:class:`InnerLoopWarning`) when adaptation raised the support loss on more than half
    of the tasks; raises :class:`~hierbayes.errors.NumericalError` when it raised it by a factor
    of :data:`DIVERGENCE_FACTOR` or to a non-finite value (the inner loop diverged: the meta-loss
    would be garbage). Costs one inner loop without a graph; ``fit`` runs it every few hundred
    meta-steps.
    """
    if guide.inner_steps == 0:
        return
    density = guide.density
    x, y, mask = batch.support_x, batch.support_y, batch.support_mask
    with torch.no_grad():
        params = {k: v.detach() for k, v in guide.global_values().items()}
        start = density.prior_mean(params, x)
        adapted = guide.adapt(params, x, y, mask)
        before = -density.log_likelihood(params, start, x, y, mask)
        after = -density.log_likelihood(params, adapted, x, y, mask)
    alpha = guide.step_size.detach()
    described = f"{float(alpha):.3g}" if alpha.numel() == 1 else "per parameter"
    scale = before.abs() + 1.0
    if not bool(torch.isfinite(after).all()) or bool((after > DIVERGENCE_FACTOR * scale).any()):
        raise NumericalError(
            f"meta-step {step}: the inner loop diverged: {inner_steps_text(guide)} at "
            f"step_size {described} took the support negative log likelihood from "
            f"{float(before.max()):.4g} to {float(after.max()):.4g} on some task. Lower "
            "step_size (it multiplies the gradient of the summed support log likelihood, so it "
            "must shrink as tasks get more points)."
        )
    worse = int((after > before).sum())
    if 2 * worse > before.numel():
        warnings.warn(
            f"the inner loop raised the support loss on {worse} of {before.numel()} tasks: "
            f"step_size {described} is too large for this model and these tasks; lower it",
            InnerLoopWarning,
            stacklevel=2,
        )


def inner_steps_text(guide: TruncatedGradientGuide) -> str:
    return f"{guide.inner_steps} inner step" + ("" if guide.inner_steps == 1 else "s")


#: A step whose objective differs from the recent typical magnitude by more than this factor
#: stops the run.
JUMP_FACTOR = 1e6


def check_jump(history: Sequence[float], value: float, step: int) -> None:
    """Raise :class:`~hierbayes.errors.NumericalError` when ``value`` is orders of magnitude
    away from the objective's recent values (the median magnitude of the last 20 steps)."""
    if len(history) < 5:
        return
    typical = statistics.median(abs(v) for v in history[-20:])
    if abs(value) > JUMP_FACTOR * (typical + 1.0):
        raise NumericalError(
            f"meta-step {step}: the objective jumped to {value:.4g} from values of magnitude "
            f"{typical:.4g}: parameters reached extreme values (a scale near 0, a weight "
            "overflowing). The parameters are those after the previous step."
        )


#: A positive global that ended below this fraction of where it started is reported.
BOUNDARY_FRACTION = 1e-3


def boundary_warnings(
    sites: Sequence[Any], start: Mapping[str, Tensor], end: Mapping[str, Tensor], method: str
) -> None:
    """Warn, per site, when a positive global latent ended near zero (below
    :data:`BOUNDARY_FRACTION` of its starting value)."""
    for site in sites:
        if not _positive(site.support) or site.name not in start or site.name not in end:
            continue
        first, last = start[site.name].detach(), end[site.name].detach()
        if first.numel() != 1:
            continue
        a, b = float(first), float(last)
        if math.isfinite(a) and a > 0 and b < BOUNDARY_FRACTION * a:
            warnings.warn(
                f"the global {site.name!r} fell from {a:.3g} to {b:.3g}, towards its boundary at "
                f"0: the {method} objective peaks there for these tasks (for a group scale, the "
                "marginal likelihood is maximised at 0 when the groups look alike: eight schools "
                "is the classic case). Its point estimate is then not meaningful; keep it fixed, "
                "give it a hyperprior that keeps it from 0, or integrate it out (NUTS over all "
                "latents).",
                UserWarning,
                stacklevel=3,
            )


def _positive(support: Any) -> bool:
    r"""Whether ``support`` is :math:`(0, \infty)` or :math:`[0, \infty)` (a scale's)."""
    if isinstance(support, constraints.independent):
        return _positive(support.base_constraint)
    bounded = isinstance(support, (constraints.greater_than, constraints.greater_than_eq))
    return bounded and float(support.lower_bound) == 0.0
