r"""Groups as tasks: the Minnesota radon data and eight schools, one task per group.

A grouped data set is the statistician's hierarchical model read as meta-learning: group
:math:`j` (a county, a school) is task :math:`j`, its parameters :math:`\phi_j` (a county's
intercept) are drawn around global ones (Gelman & Hill 2006, ch. 12; Grant et al. 2018, §1).
Empirical Bayes scores **all** of each group's data once, so these tasks have a support set
only and **no query set**: fit them with an evidence objective
(``fit(model, tasks, method="llama", objective="evidence")``).

Layout, for both loaders: task :math:`j`'s ``support_x`` is ``(N_j, K)``, one row per
observation and one column per feature named in :attr:`GroupedTasks.feature_names`;
``support_y`` is ``(N_j,)``. **Group-level predictors** (a county's log uranium, its mean
floor) are columns of ``x`` repeated on every row of the group, so any model sees them as
ordinary inputs; they are also kept once per group in :attr:`GroupedTasks.group_predictors`
(``(J,)`` each) and travel in every batch's ``info`` (``info[name]``, ``(T,)``), beside the
group's size (``info["group_size"]``). ``task_ids`` of a batch index
:attr:`GroupedTasks.group_names` and :attr:`GroupedTasks.group_ids`.

The data come from posteriordb (BSD-3; ``hierbayes/data/posteriordb/LICENCE.md`` and
``SOURCE.md``): ``radon_mn_contextual_derived.json`` (919 houses in 85 counties, as in
Inference Gym's radon contextual-effects target) and ``eight_schools.json`` (Rubin 1981).
The files carry county ids (1..85, alphabetical by county name) but not the names, so the
radon groups are labelled ``"county 1"`` .. ``"county 85"``.

References
----------
1. Gelman & Hill (2006). *Data Analysis Using Regression and Multilevel/Hierarchical Models*.
2. Rubin (1981). Estimation in parallel randomized experiments. *J. Educ. Stat.* 6(4).
3. Magnusson et al. (2024). posteriordb: testing, benchmarking and developing Bayesian
   inference algorithms. arXiv:2407.04967.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from importlib.resources import files
from typing import Any

import torch
from torch import Tensor

from hierbayes.errors import TaskDataError
from hierbayes.tasks.batch import TaskBatch
from hierbayes.tasks.collection import TaskCollection

__all__ = [
    "CONTEXTUAL_FEATURES",
    "RADON_FEATURES",
    "GroupedTasks",
    "eight_schools_tasks",
    "radon_tasks",
]

#: The radon features a task's ``x`` can hold: house level (``floor``: 0 basement, 1 first
#: floor) and county level (``log_uranium``, ``floor_by_county``: the county's mean floor).
RADON_FEATURES = ("log_uranium", "floor", "floor_by_county")
#: The contextual-effects model's columns, in the order of its weights (w1, w2, w3).
CONTEXTUAL_FEATURES = RADON_FEATURES
_COUNTY_LEVEL = ("log_uranium", "floor_by_county")


class GroupedTasks(TaskCollection):
    r"""A :class:`~hierbayes.tasks.TaskCollection` whose tasks are the groups of a data set.

    Support sets only (``has_query`` is ``False``). Beyond the collection it keeps

    Attributes
    ----------
    group_names:
        One label per group, in the data file's order (``"county 1"``, ``"A"``).
    group_ids:
        ``(J,)`` the groups' ids in the data file (county index, 1-based).
    feature_names:
        The columns of every task's ``x``.
    group_predictors:
        ``{name: (J,)}`` group-level values, one per group (also in each batch's ``info``).
    group_sizes:
        ``(J,)`` observations per group.
    """

    def __init__(
        self,
        tasks: Sequence[Sequence[Any]],
        *,
        group_names: Sequence[str],
        group_ids: Tensor,
        feature_names: Sequence[str],
        group_predictors: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(tasks, require_query=False, dtype=dtype)
        J = self.num_tasks
        if len(group_names) != J or group_ids.shape != (J,):
            raise TaskDataError(
                f"{J} groups need {J} names and ids; got {len(group_names)} names and ids of "
                f"shape {tuple(group_ids.shape)}"
            )
        self.group_names = list(group_names)
        self.group_ids = group_ids
        self.feature_names = tuple(feature_names)
        reference = self._columns["support_y"][0]
        self.group_predictors = {
            k: v.to(reference.dtype) if torch.is_floating_point(v) else v
            for k, v in group_predictors.items()
        }
        self.group_sizes = torch.tensor([y.shape[0] for y in self._columns["support_y"]])
        for key, value in self.group_predictors.items():
            if value.shape != (J,):
                raise TaskDataError(
                    f"group predictor {key!r} must have shape ({J},), one value per group; got "
                    f"{tuple(value.shape)}"
                )

    def batch(self, index: Sequence[int] | Tensor | None = None) -> TaskBatch:
        """The groups at ``index`` (all by default), with their group-level predictors and
        sizes in ``info``."""
        batch = super().batch(index)
        assert batch.task_ids is not None
        idx = batch.task_ids
        info = {k: v[idx] for k, v in self.group_predictors.items()}
        info["group_size"] = self.group_sizes[idx]
        return TaskBatch(
            batch.support_x,
            batch.support_y,
            support_mask=batch.support_mask,
            task_ids=idx,
            info=info,
            validate=False,
        )

    def __repr__(self) -> str:
        sizes = self.group_sizes
        return (
            f"GroupedTasks({self.num_tasks} groups, {int(sizes.sum())} observations, "
            f"{int(sizes.min())} to {int(sizes.max())} a group, features {list(self.feature_names)})"
        )


def _read_json(path: str | os.PathLike[str] | None, name: str) -> dict[str, Any]:
    if path is None:
        text = (files("hierbayes.data") / "posteriordb" / name).read_text()
        where = f"hierbayes/data/posteriordb/{name}"
    else:
        where = os.fspath(path)
        try:
            with open(path) as handle:
                text = handle.read()
        except OSError as err:
            raise TaskDataError(f"cannot read {where}: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise TaskDataError(f"{where} must hold a JSON object; got {type(data).__name__}")
    data["__where__"] = where
    return data


def _field(data: Mapping[str, Any], key: str, length: int | None) -> list[Any]:
    where = data["__where__"]
    if key not in data:
        known = sorted(k for k in data if k != "__where__")
        raise TaskDataError(f"{where} has no field {key!r}; it has {known}")
    value = data[key]
    if not isinstance(value, list):
        raise TaskDataError(f"{where}: field {key!r} must be a list; got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise TaskDataError(f"{where}: field {key!r} has {len(value)} entries; expected {length}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TaskDataError(
                f"{where}: field {key!r} entry {i} is {v!r}; expected a finite number"
            )
    return value


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskDataError(
            f"{data['__where__']}: field {key!r} must be a positive integer; got {value!r}"
        )
    return value


def radon_tasks(
    features: Sequence[str] = CONTEXTUAL_FEATURES,
    *,
    dtype: torch.dtype | None = None,
    path: str | os.PathLike[str] | None = None,
) -> GroupedTasks:
    r"""The Minnesota radon data, one task per county (85 counties, 919 houses).

    Task :math:`j` (county :math:`j`) holds its houses' log radon as ``support_y``
    ``(N_j,)`` and the chosen ``features`` as ``support_x`` ``(N_j, K)``; no query set.
    County sizes run from 1 to 116 houses (median 5), so batches are padded and masked.

    Parameters
    ----------
    features:
        Columns of ``x``, any of :data:`RADON_FEATURES`: ``"log_uranium"`` (the county's
        log uranium, w1 of the contextual model), ``"floor"`` (0 basement, 1 first floor, w2),
        ``"floor_by_county"`` (the county's mean floor, w3). The default is the
        contextual-effects model's (:class:`~hierbayes.models.ContextualEffects`);
        ``("floor",)`` is Gelman & Hill's varying-intercept model; ``()`` no predictors.
    dtype:
        Floating-point type of the data (default: torch's default dtype).
    path:
        A file in the format of ``radon_mn_contextual_derived.json`` (fields ``N``, ``J``,
        ``county_idx`` (1-based), ``floor``, ``log_radon``, ``log_uranium`` (one per house),
        ``floor_by_county`` (one per county)); the copy shipped with hierbayes by default.

    Returns
    -------
    GroupedTasks
        With ``group_predictors`` ``log_uranium`` and ``floor_by_county`` (``(85,)`` each),
        ``group_names`` ``"county 1"`` .. ``"county 85"`` (alphabetical order of the county
        names, which the file does not carry) and ``group_ids`` 1..85.
    """
    features = tuple(features)
    unknown = [f for f in features if f not in RADON_FEATURES]
    if unknown or len(set(features)) != len(features):
        raise TaskDataError(
            f"radon_tasks features must be distinct names from {list(RADON_FEATURES)}; got "
            f"{list(features)}"
        )
    data = _read_json(path, "radon_mn_contextual_derived.json")
    where = data["__where__"]
    N, J = _count(data, "N"), _count(data, "J")
    county = _field(data, "county_idx", N)
    bad = [i for i, c in enumerate(county) if c != int(c) or not 1 <= c <= J]
    if bad:
        raise TaskDataError(
            f"{where}: county_idx entry {bad[0]} is {county[bad[0]]!r}; expected an integer in "
            f"1..{J} ({len(bad)} bad entries)"
        )
    columns = {
        "floor": torch.tensor(_field(data, "floor", N), dtype=torch.float64),
        "log_radon": torch.tensor(_field(data, "log_radon", N), dtype=torch.float64),
        "log_uranium": torch.tensor(_field(data, "log_uranium", N), dtype=torch.float64),
    }
    floor_by_county = torch.tensor(_field(data, "floor_by_county", J), dtype=torch.float64)
    idx = torch.tensor([int(c) - 1 for c in county])
    columns["floor_by_county"] = floor_by_county[idx]
    sizes = torch.bincount(idx, minlength=J)
    empty = (sizes == 0).nonzero().flatten().tolist()
    if empty:
        raise TaskDataError(
            f"{where}: county {empty[0] + 1} has no houses ({len(empty)} empty counties of {J}); "
            "every county needs at least one"
        )
    log_uranium = torch.empty(J, dtype=torch.float64)
    tasks = []
    for j in range(J):
        rows = (idx == j).nonzero().flatten()
        values = columns["log_uranium"][rows]
        if not bool((values == values[0]).all()):
            raise TaskDataError(
                f"{where}: log_uranium is a county-level predictor but county {j + 1} has "
                f"several values ({sorted(set(values.tolist()))[:3]} ...)"
            )
        log_uranium[j] = values[0]
        x = torch.zeros(len(rows), len(features), dtype=torch.float64)
        for k, name in enumerate(features):
            x[:, k] = columns[name][rows]
        tasks.append((x, columns["log_radon"][rows]))
    return GroupedTasks(
        tasks,
        group_names=[f"county {j + 1}" for j in range(J)],
        group_ids=torch.arange(1, J + 1),
        feature_names=features,
        group_predictors={"log_uranium": log_uranium, "floor_by_county": floor_by_county},
        dtype=dtype,
    )


def eight_schools_tasks(
    *, dtype: torch.dtype | None = None, path: str | os.PathLike[str] | None = None
) -> GroupedTasks:
    r"""Eight schools (Rubin 1981), one task per school, for :class:`~hierbayes.models.EightSchools`.

    School :math:`j`'s one observation is its estimated coaching effect :math:`y_j`
    (``support_y`` ``(1,)``) with its known standard error :math:`\sigma_j` as the one input
    feature (``support_x`` ``(1, 1)``, feature ``"sigma"``); no query set. The schools are
    named ``"A"`` .. ``"H"`` as in Gelman et al. (2013, BDA3 §5.5).
    """
    data = _read_json(path, "eight_schools.json")
    J = _count(data, "J")
    y = torch.tensor(_field(data, "y", J), dtype=torch.float64)
    sigma = torch.tensor(_field(data, "sigma", J), dtype=torch.float64)
    if not bool((sigma > 0).all()):
        j = int((sigma <= 0).nonzero()[0])
        raise TaskDataError(
            f"{data['__where__']}: school {j + 1}'s standard error sigma is {float(sigma[j])}; "
            "standard errors must be positive"
        )
    names = [chr(ord("A") + j) if j < 26 else f"school {j + 1}" for j in range(J)]
    return GroupedTasks(
        [(sigma[j].reshape(1, 1), y[j].reshape(1)) for j in range(J)],
        group_names=names,
        group_ids=torch.arange(1, J + 1),
        feature_names=("sigma",),
        group_predictors={"sigma": sigma},
        dtype=dtype,
    )
