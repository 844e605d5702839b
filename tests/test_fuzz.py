"""Fuzzing ``fit``: generated task batches and option combinations, a few meta-steps each.

Every example must end in a :class:`~hierbayes.inference.FitResult` with finite global values
and history, or in one of the documented errors (the README's bad-input table) — never another
exception, a hang or a NaN :math:`\\theta`. Warnings may be issued (a too-large step, a
meta-batch larger than the tasks, a clamp) and are ignored here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import hierbayes
from hierbayes.errors import HierbayesError, ModelContractError, NumericalError, TaskDataError
from hierbayes.inference import FitResult, MetaTrainingDiverged, fit
from hierbayes.models import BayesianLinearRegression, NeuralRegression
from hierbayes.tasks import TaskBatch
from tests.helpers import tiny_mlp

#: The errors ``fit`` documents for bad input and for training that goes wrong; a plain
#: ``ValueError`` or ``TypeError`` counts only when hierbayes raised it (one from torch or
#: Pyro deep inside a computation is a crash).
DOCUMENTED = (
    TaskDataError,
    ModelContractError,
    MetaTrainingDiverged,
    NumericalError,
    ValueError,
    TypeError,
)
PACKAGE = Path(hierbayes.__file__).parent


def raised_by_hierbayes(err: BaseException) -> bool:
    if isinstance(err, HierbayesError):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).is_relative_to(PACKAGE)


#: What is wrong with a generated task set ("none" three times: clean data, most often;
#: "wrong_features": one input feature more than the model takes).
CORRUPTIONS = (
    *("none",) * 3,
    "wrong_features",
    "nan",
    "inf",
    "huge",
    "empty_support",
    "empty_query",
    "int_x",
    "float32_y",
)


@dataclass(frozen=True)
class Tasks:
    """A generated task set: sizes, features, how the data is given and what is wrong with it."""

    sizes: tuple[tuple[int, int], ...]  # (N_j, M_j) per task
    features: int  # the model's input features
    container: str  # "batch" (equal sizes) or "collection" (possibly ragged)
    corruption: str
    scale: float
    seed: int

    def build(self) -> Any:
        rng = np.random.default_rng(self.seed)
        d = self.features + (self.corruption == "wrong_features")
        tasks = []
        for n, m in self.sizes:
            w = rng.standard_normal((d, 1))
            xs, xq = (rng.standard_normal((k, d)) for k in (n, m))
            ys = self.scale * (xs @ w + 0.1 * rng.standard_normal((n, 1)))
            yq = self.scale * (xq @ w + 0.1 * rng.standard_normal((m, 1)))
            tasks.append([xs, ys, xq, yq])
        self._corrupt(tasks, rng)
        if self.container == "collection":
            return tasks
        sx, sy, qx, qy = (torch.as_tensor(np.stack([t[i] for t in tasks])) for i in range(4))
        return TaskBatch(sx, sy, qx, qy)

    def _corrupt(self, tasks: list[list[np.ndarray]], rng: np.random.Generator) -> None:
        j = int(rng.integers(len(tasks)))
        field = int(rng.integers(4))
        if self.corruption in ("nan", "inf", "huge"):
            value = {"nan": np.nan, "inf": np.inf, "huge": 1e200}[self.corruption]
            tasks[j][field] = tasks[j][field].copy()
            tasks[j][field].flat[0] = value
        elif self.corruption in ("empty_support", "empty_query"):
            # one task of a collection; every task of a batch (which is rectangular)
            first = 0 if self.corruption == "empty_support" else 2
            for t in tasks if self.container == "batch" else [tasks[j]]:
                t[first], t[first + 1] = t[first][:0], t[first + 1][:0]
        elif self.corruption == "int_x":
            for t in tasks:
                t[0], t[2] = (np.round(a).astype(np.int64) for a in (t[0], t[2]))
        elif self.corruption == "float32_y":
            for t in tasks:
                t[1], t[3] = t[1].astype(np.float32), t[3].astype(np.float32)


@st.composite
def task_sets(draw: st.DrawFn, features: int | None = None) -> Tasks:
    container = draw(st.sampled_from(["batch", "collection"]))
    T = draw(st.integers(1, 4))
    if container == "batch":
        size = (draw(st.integers(1, 5)), draw(st.integers(1, 4)))
        sizes = (size,) * T
    else:
        sizes = tuple((draw(st.integers(1, 5)), draw(st.integers(1, 4))) for _ in range(T))
    corruption = draw(st.sampled_from(CORRUPTIONS))
    return Tasks(
        sizes=sizes,
        features=features if features is not None else draw(st.integers(1, 2)),
        container=container,
        corruption=corruption,
        scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def fit_options(draw: st.DrawFn) -> dict[str, Any]:
    method = draw(st.sampled_from(["maml", "llama"]))
    options: dict[str, Any] = dict(
        method=method,
        meta_steps=draw(st.sampled_from([2, 3])),
        meta_batch_size=draw(st.integers(1, 5)),
        inner_steps=draw(st.integers(0, 3)),
        step_size=10 ** draw(st.floats(-4, 1)),
        learn_step_size=draw(st.sampled_from(["fixed", "scalar", "per_parameter"])),
        first_order=draw(st.booleans()),
        inner_objective=draw(st.sampled_from(["likelihood", "joint"])),
        lr=10 ** draw(st.floats(-4, -1)),
        seed=draw(st.integers(0, 3)),
        progress=False,
    )
    if method == "llama":
        options["objective"] = draw(st.sampled_from(["predictive", "evidence", "paper"]))
        options["curvature"] = draw(st.sampled_from(["ggn", "diag", "full"]))
    return options


def fit_ends_cleanly(model: Any, tasks: Tasks, options: dict[str, Any]) -> None:
    """Run ``fit``; pass on a finite result or a documented error, fail on anything else."""
    event(f"data: {tasks.container}, {tasks.corruption}")
    try:
        data = tasks.build()  # a TaskBatch validates its data as it is built
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fit(model, data, **options)
    except DOCUMENTED as err:
        event(f"{type(err).__name__}: {str(err)[:60]}")
        if not raised_by_hierbayes(err):
            raise
        assert str(err), f"{type(err).__name__} without a message"
        if isinstance(err, MetaTrainingDiverged):
            _assert_finite(err.result)
        return
    event("a result")
    _assert_finite(result)


def _assert_finite(result: FitResult) -> None:
    for name, value in result.params.items():
        assert bool(torch.isfinite(value).all()), f"global {name!r} is not finite: {value}"
    assert all(math.isfinite(v) for v in result.history), result.history


@settings(max_examples=150, deadline=None)
@given(tasks=task_sets(features=1), options=fit_options())
def test_fit_of_a_small_network_ends_in_a_result_or_a_documented_error(
    tasks: Tasks, options: dict[str, Any]
) -> None:
    fit_ends_cleanly(NeuralRegression(tiny_mlp(3)), tasks, options)


@settings(max_examples=150, deadline=None)
@given(tasks=task_sets(), options=fit_options(), learn_noise=st.booleans(), bias=st.booleans())
def test_fit_of_linear_regression_ends_in_a_result_or_a_documented_error(
    tasks: Tasks, options: dict[str, Any], learn_noise: bool, bias: bool
) -> None:
    model = BayesianLinearRegression(tasks.features, bias=bias, learn_noise=learn_noise)
    fit_ends_cleanly(model, tasks, options)
