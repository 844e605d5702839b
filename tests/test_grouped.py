"""Groups as tasks: the radon and eight-schools loaders, the grouped models, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hierbayes
from hierbayes.errors import ModelContractError, TaskDataError
from hierbayes.inference import fit
from hierbayes.models import (
    ContextualEffects,
    VaryingIntercepts,
    VaryingInterceptsSlopes,
    model_structure,
)
from hierbayes.tasks import GroupedTasks, eight_schools_tasks, radon_tasks

DATA = Path(hierbayes.__file__).parent / "data" / "posteriordb"


def test_radon_counties_are_tasks_with_all_houses_in_the_support_set() -> None:
    tasks = radon_tasks()
    assert isinstance(tasks, GroupedTasks) and not tasks.has_query
    assert tasks.num_tasks == 85 and int(tasks.group_sizes.sum()) == 919
    assert (int(tasks.group_sizes.min()), int(tasks.group_sizes.max())) == (1, 116)
    assert tasks.group_names[0] == "county 1" and tasks.group_ids.tolist()[-1] == 85
    batch = tasks.batch()
    assert batch.query_x is None and batch.support_x.shape == (85, 116, 3)
    assert batch.support_mask is not None
    torch.testing.assert_close(batch.support_mask.sum(1), tasks.group_sizes)
    # the county-level columns are constant within a county and equal the group predictors
    torch.testing.assert_close(batch.support_x[:, 0, 0], tasks.group_predictors["log_uranium"])
    torch.testing.assert_close(batch.support_x[:, 0, 2], tasks.group_predictors["floor_by_county"])
    torch.testing.assert_close(batch.info["log_uranium"], tasks.group_predictors["log_uranium"])
    sub = tasks.batch([3, 1])
    assert sub.task_ids.tolist() == [3, 1]
    torch.testing.assert_close(sub.info["group_size"], tasks.group_sizes[[3, 1]])


def test_radon_feature_choice_and_its_errors() -> None:
    assert radon_tasks(features=("floor",)).batch().support_x.shape[-1] == 1
    assert radon_tasks(features=()).batch().support_x.shape[-1] == 0
    with pytest.raises(TaskDataError, match="features"):
        radon_tasks(features=("basement",))


def test_radon_loader_reports_bad_files(tmp_path: Path) -> None:
    data = json.loads((DATA / "radon_mn_contextual_derived.json").read_text())
    broken = dict(data, county_idx=[*data["county_idx"][:-1], 86])
    path = tmp_path / "radon.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(
        TaskDataError, match=r"county_idx entry 918 is 86; expected an integer in 1\.\.85"
    ):
        radon_tasks(path=path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "floor"}))
    with pytest.raises(TaskDataError, match="no field 'floor'"):
        radon_tasks(path=path)
    path.write_text(json.dumps(dict(data, log_radon=data["log_radon"][:10])))
    with pytest.raises(TaskDataError, match=r"log_radon.*10 entries; expected 919"):
        radon_tasks(path=path)


def test_eight_schools_tasks() -> None:
    tasks = eight_schools_tasks()
    batch = tasks.batch()
    assert tasks.group_names == list("ABCDEFGH")
    assert batch.support_y.reshape(-1).tolist() == [28, 8, -3, 7, -1, 1, 18, 12]
    assert batch.support_x.reshape(-1).tolist() == [15, 10, 16, 11, 9, 11, 10, 18]


@pytest.mark.parametrize(
    ("model", "features", "task_site", "globals_"),
    [
        (ContextualEffects(), None, "alpha", {"mu", "tau", "w", "sigma"}),
        (VaryingIntercepts(0), (), "alpha", {"mu", "tau", "sigma"}),
        (
            VaryingInterceptsSlopes(2, varying=1),
            ("floor", "log_uranium"),
            "coef",
            {"mu", "tau", "w", "sigma"},
        ),
    ],
)
def test_grouped_models_follow_the_contract(model, features, task_site, globals_) -> None:  # type: ignore[no-untyped-def]
    tasks = radon_tasks() if features is None else radon_tasks(features=features)
    batch = tasks.batch()
    structure = model_structure(model, batch.support_x, batch.support_y)
    assert structure.task_site == task_site
    assert {s.name for s in structure.global_sites} == globals_


def test_model_refuses_the_wrong_columns() -> None:
    batch = radon_tasks(features=("floor",)).batch()
    with pytest.raises(ModelContractError, match="radon_tasks"):
        ContextualEffects()(batch.support_x, batch.support_y)


def test_a_grouped_fit_saves_and_loads_without_the_model(tmp_path: Path) -> None:
    tasks = radon_tasks(features=("floor",))
    with pytest.warns(UserWarning, match="before converging"):
        result = fit(
            VaryingIntercepts(1),
            tasks,
            method="llama",
            objective="evidence",
            meta_steps=3,
            progress=False,
            grad_tolerance=0.0,
        )
    path = result.save(tmp_path / "run.pt")
    loaded = hierbayes.load(path)
    assert isinstance(loaded.model, VaryingIntercepts)
    for name, value in result.params.items():
        torch.testing.assert_close(loaded.params[name], value)
    batch = tasks.batch()
    torch.testing.assert_close(loaded.adapt(batch).mean, result.adapt(batch).mean)
