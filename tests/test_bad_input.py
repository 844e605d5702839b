"""The bad-input table of the README, row by row: each bad input is refused with its exception
type and a message that names what was expected, what came, and which field, task or site."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor, nn

from hierbayes.errors import ModelContractError, TaskDataError
from hierbayes.inference import FitResult, MetaTrainingDiverged, fit
from hierbayes.models import (
    BayesianLinearRegression,
    CategoricalLikelihood,
    NeuralRegression,
    TaskModel,
)
from hierbayes.tasks import TaskBatch, TaskCollection
from tests.helpers import regression_batch, tiny_mlp


def short_fit(model: Any, tasks: Any, **options: Any) -> FitResult:
    settings: dict[str, Any] = dict(meta_steps=2, meta_batch_size=4, step_size=0.05, progress=False)
    settings.update(options)
    return fit(model, tasks, **settings)


def regression_tasks(J: int = 3, N: int = 4, M: int = 3, d: int = 1) -> list[tuple[Any, ...]]:
    rng = np.random.default_rng(0)
    return [
        (
            rng.standard_normal((N, d)),
            rng.standard_normal((N, 1)),
            rng.standard_normal((M, d)),
            rng.standard_normal((M, 1)),
        )
        for _ in range(J)
    ]


def classifier(classes: int = 3) -> TaskModel:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, classes))
    return TaskModel(network, CategoricalLikelihood(), prior_scale=0.5)


def as_tensors(changes: dict[str, Any]) -> dict[str, Any]:
    """A table row's fields: a shape tuple stands for zeros of that shape (made in the test, in
    the test's default dtype)."""
    return {k: torch.zeros(v) if isinstance(v, tuple) else v for k, v in changes.items()}


# -- NaN or inf in data ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["support_x", "support_y", "query_x", "query_y"])
def test_nan_or_inf_in_a_batch_names_field_task_and_point(field: str, value: float) -> None:
    batch = regression_batch(T=3, N=4, M=3)
    fields = ("support_x", "support_y", "query_x", "query_y")
    tensors: dict[str, Any] = {f: getattr(batch, f).clone() for f in fields}
    tensors[field][2, 1, 0] = value
    shown = "nan" if math.isnan(value) else str(value)
    with pytest.raises(
        TaskDataError,
        match=rf"{field} of task 2, point 1 is {shown}: every value must be finite "
        r"\(1 task\(s\) of 3 hold NaN or inf\)",
    ):
        TaskBatch(**tensors)


def test_nan_in_a_list_of_tasks_is_refused_by_fit_before_training() -> None:
    tasks = regression_tasks()
    tasks[1][3][2, 0] = np.nan
    with pytest.raises(TaskDataError, match=r"query_y of task 1, point 2 is nan"):
        short_fit(NeuralRegression(tiny_mlp(3)), tasks)


# -- wrong shapes or feature sizes -----------------------------------------------------------

SHAPE_ROWS: list[tuple[str, dict[str, Any], str]] = [
    (
        "no task dimension",
        dict(support_x=(4,), support_y=(4,)),
        r"support_x must have shape \(tasks, points, \.\.\.\) with the task dimension first; "
        r"got shape \(4,\)",
    ),
    (
        "tasks differ",
        dict(query_x=(2, 3, 1), query_y=(3, 3, 1)),
        r"query_x has 2 tasks and query_y has 3; support_x has 3",
    ),
    (
        "points differ",
        dict(support_y=(3, 5, 1)),
        r"support_x has 4 points per task but support_y has 5",
    ),
    (
        "features differ between support and query",
        dict(query_x=(3, 3, 2)),
        r"query_x points have shape \(2,\) but support_x points have \(1,\)",
    ),
    (
        "mask of the wrong shape",
        dict(support_mask=torch.ones(3, 5, dtype=torch.bool)),
        r"support_mask must be a boolean tensor of shape \(3, 4\); got torch.bool \(3, 5\)",
    ),
    (
        "a numpy array",
        dict(support_x=np.zeros((3, 4, 1))),
        r"support_x must be a torch.Tensor .*got ndarray.*TaskCollection.from_tensors",
    ),
]


@pytest.mark.parametrize(
    "changes, message", [row[1:] for row in SHAPE_ROWS], ids=[row[0] for row in SHAPE_ROWS]
)
def test_wrong_shapes_name_the_field_and_both_shapes(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = dict(
        support_x=torch.zeros(3, 4, 1),
        support_y=torch.zeros(3, 4, 1),
        query_x=torch.zeros(3, 3, 1),
        query_y=torch.zeros(3, 3, 1),
    )
    fields.update(as_tensors(changes))
    with pytest.raises(TaskDataError, match=message):
        TaskBatch(**fields)


def test_a_task_with_other_features_than_task_0_is_named() -> None:
    tasks = regression_tasks()
    tasks[2] = tuple(np.zeros((n, w)) for n, w in [(4, 2), (4, 1), (3, 2), (3, 1)])
    with pytest.raises(
        TaskDataError,
        match=r"task 2: support_x points have shape \(2,\) and support_y \(1,\), but task 0 "
        r"has \(1,\) and \(1,\)",
    ):
        TaskCollection(tasks)


def test_targets_without_the_output_dimension_are_refused_by_field() -> None:
    batch = regression_batch(T=4, N=4, M=3)
    flat = TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y)
    with pytest.raises(
        TaskDataError,
        match=r"support_y \(shape \(4, 4\)\) does not fit the model; for task \d: targets have "
        r"shape \(1, 4\) but the model's outputs have \(1, 4, 1\).*unsqueeze",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), flat)


def test_inputs_with_more_features_than_the_network_takes() -> None:
    with pytest.raises(
        TaskDataError,
        match=r"the model's network cannot take support_x points of shape \(3,\) \(support_x is "
        r"\(4, 6, 3\).*how many features the network's first layer expects",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(T=4, d=3))


# -- labels out of range ---------------------------------------------------------------------


@pytest.mark.parametrize("label", [3, -1])
def test_a_label_out_of_range_names_task_point_and_range(label: int) -> None:
    f = torch.zeros(3, 4, 3)
    y = torch.zeros(3, 4, dtype=torch.long)
    y[2, 1] = label
    with pytest.raises(
        TaskDataError,
        match=rf"labels must lie in 0\.\.2 for the model's 3 classes; task 2, point 1 has label "
        rf"{label} \(1 of 12 labels out of range\)",
    ):
        CategoricalLikelihood().check_targets(f, y)


def test_fit_names_the_task_whose_label_is_out_of_range() -> None:
    x, xq = torch.randn(3, 6, 2), torch.randn(3, 4, 2)
    y, yq = torch.randint(0, 3, (3, 6)), torch.randint(0, 3, (3, 4))
    yq[2, 1] = 3
    with pytest.raises(
        TaskDataError,
        match=r"query_y \(shape \(3, 4\)\) does not fit the model; for task 2: labels must lie "
        r"in 0\.\.2 for the model's 3 classes; point 1 has label 3",
    ):
        short_fit(classifier(), TaskBatch(x, y, xq, yq))


def test_float_labels_are_refused() -> None:
    x = torch.randn(3, 6, 2)
    y = torch.randint(0, 3, (3, 6)).double()
    with pytest.raises(TaskDataError, match=r"labels must be integers of shape \(\d, 6\)"):
        short_fit(classifier(), TaskBatch(x, y, torch.randn(3, 4, 2), torch.randint(0, 3, (3, 4))))


# -- empty support or query ------------------------------------------------------------------

EMPTY_ROWS: list[tuple[str, dict[str, Any], str]] = [
    (
        "no tasks",
        dict(
            support_x=(0, 2, 1),
            support_y=(0, 2, 1),
            query_x=None,
            query_y=None,
        ),
        r"the batch has no tasks: support_x has shape \(0, 2, 1\)",
    ),
    (
        "no support points",
        dict(support_x=(3, 0, 1), support_y=(3, 0, 1)),
        r"support_x has no points \(shape \(3, 0, 1\)\): every task needs at least one support "
        r"point",
    ),
    (
        "no query points",
        dict(query_x=(3, 0, 1), query_y=(3, 0, 1)),
        r"query_x has no points \(shape \(3, 0, 1\)\).*give query_x=None and query_y=None",
    ),
    (
        "a task's support masked out",
        dict(support_mask=torch.tensor([[True, True], [False, False], [True, False]])),
        r"task 1 has no support points \(support_mask is all False; 1 task\(s\) of 3\)",
    ),
    (
        "a task's query masked out",
        dict(query_mask=torch.tensor([[True, True], [True, False], [False, False]])),
        r"task 2 has no query points \(query_mask is all False; 1 task\(s\) of 3\)",
    ),
]


@pytest.mark.parametrize(
    "changes, message", [row[1:] for row in EMPTY_ROWS], ids=[row[0] for row in EMPTY_ROWS]
)
def test_an_empty_support_or_query_set_is_refused(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = dict(
        support_x=torch.zeros(3, 2, 1),
        support_y=torch.zeros(3, 2, 1),
        query_x=torch.zeros(3, 2, 1),
        query_y=torch.zeros(3, 2, 1),
    )
    fields.update(as_tensors(changes))
    with pytest.raises(TaskDataError, match=message):
        TaskBatch(**fields)


def test_an_empty_set_in_a_collection_names_the_task() -> None:
    tasks = regression_tasks()
    tasks[1] = (np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(TaskDataError, match=r"task 1 has an empty support set"):
        TaskCollection(tasks)


def test_a_batch_without_a_query_set_cannot_meta_train() -> None:
    batch = regression_batch()
    with pytest.raises(
        TaskDataError,
        match=r"meta-training needs a query set for method='maml'.*objective='evidence'.*"
        r"split each task's points into support and query sets",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), TaskBatch(batch.support_x, batch.support_y))


def test_fit_on_an_empty_list_of_tasks() -> None:
    with pytest.raises(TaskDataError, match=r"a TaskCollection needs at least one task; got none"):
        short_fit(NeuralRegression(tiny_mlp(3)), [])


# -- integer inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["neural", "linear"])
def test_integer_inputs_to_a_float_network_are_refused(model: str) -> None:
    net = NeuralRegression(tiny_mlp(3)) if model == "neural" else BayesianLinearRegression(1)
    tasks = [
        (np.arange(4).reshape(4, 1), np.zeros((4, 1)), np.arange(3).reshape(3, 1), np.zeros((3, 1)))
    ] * 3
    with pytest.raises(
        TaskDataError,
        match=r"support_x is torch.int64 \(integers\) but the model computes in torch.float64: "
        r"give the inputs as floating-point values",
    ):
        short_fit(net, tasks)


def test_integer_labels_are_what_a_classifier_takes() -> None:
    x = torch.randn(3, 6, 2)
    y = torch.randint(0, 3, (3, 6))
    result = short_fit(classifier(), TaskBatch(x, y, torch.randn(3, 4, 2), y[:, :4].clone()))
    assert bool(torch.isfinite(result.theta).all())


# -- mixed dtypes or devices -----------------------------------------------------------------


def test_mixed_dtypes_in_a_batch_are_refused() -> None:
    x = torch.zeros(3, 4, 1, dtype=torch.float32)
    with pytest.raises(
        TaskDataError,
        match=r"support_y is torch.float64 but support_x is torch.float32: the floating-point "
        r"tensors of a batch need one dtype",
    ):
        TaskBatch(x, torch.zeros(3, 4, 1, dtype=torch.float64))


def test_mixed_kinds_across_the_tasks_of_a_collection_are_refused() -> None:
    tasks = regression_tasks()
    tasks[1] = (tasks[1][0], np.zeros((4, 1), dtype=np.int64), tasks[1][2], tasks[1][3])
    with pytest.raises(
        TaskDataError, match=r"task 1: support_y is torch.int64 but task 0's is torch.float64"
    ):
        TaskCollection(tasks)


def test_data_in_another_float_dtype_than_the_model_is_refused_with_advice() -> None:
    batch = regression_batch().to(dtype=torch.float32)
    with pytest.raises(
        TaskDataError,
        match=r"support_x is torch.float32 but the model is torch.float64: pass "
        r"dtype=torch.float32 to fit",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), batch)


def test_mixed_devices_in_a_batch_are_refused() -> None:
    # the "meta" device stands in for a second device on a machine without CUDA
    with pytest.raises(
        TaskDataError,
        match=r"query_y is on meta but support_x is on cpu: every tensor of a batch must be on "
        r"one device",
    ):
        TaskBatch(
            torch.zeros(3, 4, 1),
            torch.zeros(3, 4, 1),
            torch.zeros(3, 2, 1),
            torch.zeros(3, 2, 1, device="meta"),
        )


# -- a step size so large that the inner loop diverges ---------------------------------------


def test_a_diverging_inner_loop_stops_with_the_initial_state() -> None:
    model = BayesianLinearRegression(1, bias=True)
    with pytest.raises(
        MetaTrainingDiverged,
        match=r"meta-step 0: the inner loop diverged: 300 inner steps at step_size 10 .* to nan "
        r"on some task\. Lower step_size",
    ) as info:
        short_fit(model, regression_batch(), step_size=10.0, inner_steps=300, meta_steps=5)
    assert info.value.result.history == []
    assert bool(torch.isfinite(info.value.result.theta).all())


# -- a negative or zero learning rate, and other settings out of range ----------------------

SETTING_ROWS: list[tuple[str, Any, str]] = [
    ("lr", 0.0, r"lr must be a( finite)? positive number; got 0\.0"),
    ("lr", -1e-3, r"lr must be a( finite)? positive number; got -0\.001"),
    ("lr", math.nan, r"lr must be a( finite)? positive number; got nan"),
    ("step_size", 0.0, r"step_size must be a( finite)? positive number; got 0\.0"),
    ("step_size", -0.1, r"step_size must be a( finite)? positive number; got -0\.1"),
    ("meta_batch_size", 0, r"meta_batch_size must be a whole number >= 1; got 0"),
    ("meta_steps", -1, r"meta_steps must be a whole number >= 0; got -1"),
    ("inner_steps", -1, r"inner_steps must be (a whole number )?>= 0; got -1"),
    ("clip_grad_norm", 0.0, r"clip_grad_norm must be a finite positive number; got 0\.0"),
    ("learn_step_size", "scaler", r"learn_step_size must be 'fixed', 'scalar' or 'per_param"),
    ("inner_objective", "joint_", r"inner_objective must be 'likelihood' or 'joint'; got 'joint_'"),
]


@pytest.mark.parametrize(
    "name, value, message",
    SETTING_ROWS,
    ids=[f"{name}={value}" for name, value, _ in SETTING_ROWS],
)
def test_a_setting_out_of_range_is_a_value_error(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), **{name: value})


@pytest.mark.parametrize(
    "name, value",
    [("lr", math.inf), ("step_size", math.inf), ("lr", True), ("inner_steps", 1.5)],
)
def test_an_infinite_or_non_numeric_setting_is_a_value_error(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be a (finite positive|whole) number"):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), **{name: value})


# -- an unknown method, objective or curvature; a misspelled option -------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(method="reptile"),
            r"unknown method 'reptile'; registered methods: \['llama', 'maml'",
        ),
        (
            dict(method="llama", objective="predictiv"),
            r"unknown LLAMA objective 'predictiv'; known: \['evidence', 'paper', 'predictive'\]",
        ),
        (
            dict(method="llama", curvature="ggm"),
            r"unknown curvature 'ggm'; registered: \[.*'diag'.*'ggn'.*\]",
        ),
    ],
    ids=["method", "objective", "curvature"],
)
def test_an_unknown_name_lists_the_known_ones(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), **options)


def test_a_misspelled_method_option_suggests_the_close_name() -> None:
    with pytest.raises(
        TypeError,
        match=r"fit got an option 'curvture' that .*method 'llama'.*; did you mean "
        r"'curvature'\?.*options: \['curvature', ",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), method="llama", curvture="ggn")


def test_a_misspelled_fit_option_suggests_the_close_name() -> None:
    with pytest.raises(
        TypeError,
        match=r"fit got an option 'step_sise' that neither fit nor method 'maml' takes; did you "
        r"mean 'step_size'\?",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), step_sise=0.1)


def test_an_option_of_another_method_names_that_method() -> None:
    with pytest.raises(
        TypeError,
        match=r"fit got an option 'curvature' that neither fit nor method 'maml' takes \(method "
        r"'llama' takes it\)",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), curvature="ggn")
    with pytest.raises(ValueError, match=r"method 'maml' has no named objectives"):
        short_fit(NeuralRegression(tiny_mlp(3)), regression_batch(), objective="predictive")


# -- meta_batch_size above the number of tasks -----------------------------------------------


def test_a_meta_batch_larger_than_the_tasks_warns_and_uses_all() -> None:
    with pytest.warns(
        UserWarning,
        match=r"meta_batch_size=25 is larger than the 3 tasks available: every meta-step uses "
        r"all 3",
    ):
        result = short_fit(NeuralRegression(tiny_mlp(3)), regression_tasks(), meta_batch_size=25)
    assert len(result.history) == 2


# -- tasks given as a list -------------------------------------------------------------------


def test_a_list_of_task_tuples_is_taken_as_a_task_collection() -> None:
    result = short_fit(NeuralRegression(tiny_mlp(3)), regression_tasks(J=4))
    assert result.config["num_tasks"] == 4 and len(result.history) == 2


def test_a_list_of_arrays_says_how_to_give_them() -> None:
    x, y = np.zeros((5, 4, 1)), np.zeros((5, 4, 1))
    with pytest.raises(
        TaskDataError,
        match=r"task 0 is a ndarray of shape \(5, 4, 1\), not a task: a TaskCollection takes one "
        r"\(support_x, support_y, query_x, query_y\) tuple .*TaskCollection.from_tensors",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), [x, y, x, y])


def test_something_that_is_not_tasks_is_a_type_error() -> None:
    with pytest.raises(
        TypeError,
        match=r"tasks must be a TaskBatch, a list of tasks .* or a task source with "
        r"sample\(num_tasks, generator=\.\.\.\); got dict",
    ):
        short_fit(NeuralRegression(tiny_mlp(3)), {"support_x": np.zeros((3, 4, 1))})


# -- a model that breaks the contract --------------------------------------------------------


def _no_tasks_plate(x: Tensor, y: Tensor | None = None) -> None:
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(()), 1.0))
    pyro.sample("y", dist.Normal(theta, 1.0).expand(x.shape).to_event(x.dim()), obs=y)


def _observation_outside(x: Tensor, y: Tensor | None = None) -> None:
    with pyro.plate("tasks", x.shape[0], dim=-2):
        a = pyro.sample("a", dist.Normal(x.new_zeros(()), 1.0))
    pyro.sample("obs", dist.Normal(a.sum(), 1.0), obs=None if y is None else y.sum())


def _two_task_latents(x: Tensor, y: Tensor | None = None) -> None:
    with pyro.plate("tasks", x.shape[0], dim=-2):
        a = pyro.sample("a", dist.Normal(x.new_zeros(()), 1.0))
        b = pyro.sample("b", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample(
                "y", dist.Normal(a + b * x[..., 0], 1.0), obs=None if y is None else y[..., 0]
            )


def _crashes(x: Tensor, y: Tensor | None = None) -> None:
    raise KeyError("weights")


@pytest.mark.parametrize(
    "model, message",
    [
        pytest.param(
            _no_tasks_plate, r"the model has no pyro.plate\('tasks', T\)", id="no tasks plate"
        ),
        pytest.param(
            _observation_outside,
            r"observed site 'obs' is outside pyro.plate\('tasks'\)",
            id="observation outside",
        ),
        pytest.param(
            _two_task_latents,
            r"the model has 2 per-task latents \['a', 'b'\]; hierbayes adapts",
            id="two per-task latents",
        ),
        pytest.param(
            _crashes,
            r"running the model on a batch with x of shape \(4, 6, 1\) failed: KeyError",
            id="crashes",
        ),
    ],
)
def test_a_model_that_breaks_the_contract_names_the_site(
    model: Callable[..., None], message: str
) -> None:
    with pytest.raises(ModelContractError, match=message) as info:
        short_fit(model, regression_batch())
    assert "A hierbayes model is a Pyro program" in str(info.value)


def test_all_task_methods_refuse_an_endless_family_with_the_fix() -> None:
    from hierbayes.inference.posteriors import hyper_laplace
    from hierbayes.inference.references import nuts_full_bayes
    from hierbayes.tasks import SinusoidTasks

    for method in (hyper_laplace, nuts_full_bayes):
        with pytest.raises(TypeError, match=r"needs a finite set of tasks.*got SinusoidTasks"):
            method(NeuralRegression(tiny_mlp(3)), SinusoidTasks(shots=5))
