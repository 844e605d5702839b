"""Warnings are issued when they happen, through the caller's filters, and never lost (issue 19,
break 4): an ``error`` filter stops the run at the step that warned; a run that raises still
issues what warned before; a warning repeated at every step is shown once when it first happens
and once more, with its count, when the run ends."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from hierbayes.inference import MAMLObjective, MetaTrainingDiverged, fit
from hierbayes.inference.objectives import TaskLosses
from hierbayes.inference.training.guards import InnerLoopWarning
from hierbayes.models import BayesianLinearRegression
from hierbayes.models.density import TaskDensity
from hierbayes.tasks import TaskBatch
from tests.helpers import regression_batch


class StepWarning(UserWarning):
    """What the objective below says at every call."""


class WarnsThenDiverges(MAMLObjective):
    """MAML's loss, warning at every call and NaN from call ``nan_at`` on."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.nan_at = nan_at
        self.calls = [0]  # a counter for the test, not state the loss reads back

    def task_losses(
        self, density: TaskDensity, params: Mapping[str, Tensor], phi: Tensor, batch: TaskBatch
    ) -> TaskLosses:
        self.calls[0] += 1
        warnings.warn(f"call {self.calls[0]}: the objective says so", StepWarning, stacklevel=1)
        losses = super().task_losses(density, params, phi, batch).values
        if self.calls[0] >= self.nan_at:
            losses = losses * math.nan
        return TaskLosses(losses)


def test_an_error_filter_stops_the_run_at_the_step_that_warned() -> None:
    """The inner-loop check warns at step 0 (a step too large); under -W error that is raised
    at step 0, not after every step has run (it used to be re-issued after training)."""
    seen: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InnerLoopWarning, match="raised the support loss"):
            fit(
                BayesianLinearRegression(1, noise_scale=0.1),
                regression_batch(T=6, N=8),
                step_size=0.04,
                meta_steps=20,
                check_every=1,
                callback=lambda step, loss, result: seen.append(step),
                progress=False,
            )
    assert seen == []


def test_a_run_that_raises_still_issues_what_warned_before() -> None:
    objective = WarnsThenDiverges(nan_at=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MetaTrainingDiverged):
            fit(
                BayesianLinearRegression(1),
                regression_batch(T=6),
                objective=objective,
                meta_steps=10,
                progress=False,
            )
    said = [str(w.message) for w in caught if issubclass(w.category, StepWarning)]
    assert said[0] == "call 1: the objective says so"  # as it happened
    assert "[4 times in this run; the first was shown when it happened]" in said[-1]
    assert len(said) == 2


def test_a_repeated_warning_is_shown_once_then_counted_with_its_category() -> None:
    objective = WarnsThenDiverges(nan_at=10**9)
    with pytest.warns(StepWarning) as record:
        fit(
            BayesianLinearRegression(1),
            regression_batch(T=6),
            objective=objective,
            meta_steps=5,
            progress=False,
        )
    said = [w for w in record if issubclass(w.category, StepWarning)]
    assert [str(w.message) for w in said] == [
        "call 1: the objective says so",
        "call 1: the objective says so [5 times in this run; the first was shown when it happened]",
    ]
    assert said[0].filename.endswith("test_live_warnings.py")  # where it was raised


def test_an_ignore_filter_is_respected() -> None:
    objective = WarnsThenDiverges(nan_at=10**9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=StepWarning)
        fit(
            BayesianLinearRegression(1),
            regression_batch(T=6),
            objective=objective,
            meta_steps=3,
            progress=False,
        )
    assert not [w for w in caught if issubclass(w.category, StepWarning)]
    assert torch.isfinite(torch.tensor(objective.calls[0]))


def _too_large_a_step(meta_steps: int) -> None:
    """A run whose inner-loop check (hierbayes's code) warns at every step."""
    fit(
        BayesianLinearRegression(1, noise_scale=0.1),
        regression_batch(T=6, N=8),
        step_size=0.04,
        meta_steps=meta_steps,
        check_every=1,
        progress=False,
    )


def test_a_module_filter_applies_as_it_does_where_the_warning_was_raised() -> None:
    """A filter on the module (``-W ignore::InnerLoopWarning:hierbayes``) drops the warning and
    its count: both are issued from the module that raised the warning, not from a file path or
    from the caller of fit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _too_large_a_step(4)
    said = [w for w in caught if issubclass(w.category, InnerLoopWarning)]
    assert len(said) == 2  # the first, and the count of 4
    assert "[4 times in this run" in str(said[1].message)
    assert said[0].filename == said[1].filename  # both where the inner-loop check warned
    assert said[0].lineno == said[1].lineno
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=InnerLoopWarning, module=r"hierbayes\.")
        _too_large_a_step(4)
    assert not [w for w in caught if issubclass(w.category, InnerLoopWarning)]
