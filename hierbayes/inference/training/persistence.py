r"""Saving, loading and checkpointing a meta-training run, with no arbitrary pickles.

A saved run is one file written by ``torch.save`` that ``torch.load(..., weights_only=True)``
reads: plain containers of tensors, numbers and strings. It holds

* the model: its state (``state_dict`` of a module model, the unconstrained values of a
  function model's ``pyro.param`` sites) and, for a built-in model, how to construct it again;
* the guide: its options and its state (point estimates, learned step sizes), and one task of
  support data to trace the model on when the guide is rebuilt;
* the method, the objective's options and the run's configuration;
* the loss history, the wall time, the optimiser's and the learning-rate schedule's state, and
  the random-number generators' states (torch's global one and the task sampler's), so that a
  run resumed from a checkpoint takes exactly the steps the uninterrupted run would have.

Files are written atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the target, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyro
import torch
from pyro import poutine
from torch import Tensor

from hierbayes.errors import HierbayesError
from hierbayes.models.conv import ConvClassifier
from hierbayes.models.grouped import (
    ContextualEffects,
    EightSchools,
    GroupedModel,
    VaryingIntercepts,
    VaryingInterceptsSlopes,
)
from hierbayes.models.linear import BayesianLinearRegression
from hierbayes.models.neural import NeuralRegression
from hierbayes.models.param_store import use_own_parameters
from hierbayes.models.task_model import TaskModel


class SavableRun(Protocol):
    """What a saved run is read from and written into (a
    :class:`~hierbayes.inference.FitResult` is one)."""

    model: Any
    guide: Any
    method: str
    config: dict[str, Any]
    history: list[float]
    wall_time: float
    example: tuple[Tensor, Tensor] | None
    training: Any
    saved_training: dict[str, Any] | None


__all__ = [
    "FORMAT",
    "CheckpointError",
    "SavableRun",
    "SavedRun",
    "check_compatible",
    "describe_model",
    "load_states",
    "read_run",
    "restore_run",
    "run_state",
    "state_mismatch",
    "write_atomic",
]

#: The format tag and version every saved run carries.
FORMAT = "hierbayes-fit"
VERSION = 1

#: Built-in models that can be constructed again from their saved description.
BUILTIN_MODELS: dict[str, Callable[..., Any]] = {
    "NeuralRegression": NeuralRegression,
    "BayesianLinearRegression": BayesianLinearRegression,
    "ConvClassifier": ConvClassifier,
    "VaryingIntercepts": VaryingIntercepts,
    "ContextualEffects": ContextualEffects,
    "VaryingInterceptsSlopes": VaryingInterceptsSlopes,
    "EightSchools": EightSchools,
}


class CheckpointError(HierbayesError, ValueError):
    """A saved run or checkpoint that cannot be read, or does not match what it is loaded into."""


def describe_model(model: Any) -> dict[str, Any] | None:
    """How to construct ``model`` again (``{"class": name, "kwargs": {...}}``), or ``None`` for a
    model that only its author can rebuild (a function, a custom network)."""
    description = model.constructor if isinstance(model, (TaskModel, GroupedModel)) else None
    if description is None or description.get("class") not in BUILTIN_MODELS:
        return None
    return {"class": str(description["class"]), "kwargs": dict(description["kwargs"])}


def param_store_values(names: tuple[str, ...]) -> dict[str, Tensor]:
    """The unconstrained values of a function model's ``pyro.param`` sites, by name."""
    store = pyro.get_param_store()
    return {
        name: store.get_param(name).unconstrained().detach().clone()  # type: ignore[attr-defined]
        for name in names
        if name in store
    }


def restore_param_store(
    model: Any, example: tuple[Tensor, Tensor], values: Mapping[str, Tensor]
) -> None:
    """Create a function model's ``pyro.param`` sites (running it once, so each gets the
    constraint its program declares) and set their unconstrained values.

    A module model's own parameters come back through its ``state_dict``, never through the
    store by name: entries that a file written before names stopped counting models saved
    for them (``NeuralRegression_0.theta``) are skipped."""
    counted = re.compile(rf"{re.escape(type(model).__name__)}_\d+[.$]")
    if isinstance(model, torch.nn.Module):
        values = {k: v for k, v in values.items() if not counted.match(k)}
    if not values:
        return
    with poutine.block():
        use_own_parameters(model, *example)
        poutine.trace(model).get_trace(*example)
    store = pyro.get_param_store()
    for name, value in values.items():
        if name not in store:
            raise CheckpointError(
                f"the saved run has a pyro.param {name!r} that the model does not declare"
            )
        with torch.no_grad():
            store.get_param(name).unconstrained().copy_(value)  # type: ignore[attr-defined]


def write_atomic(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@dataclass(frozen=True)
class SavedRun:
    """A saved run, read and checked: the plain dictionary ``FitResult.state_dict`` wrote."""

    path: Path
    state: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.state["config"])

    @property
    def step(self) -> int:
        return len(self.state["history"])


_REQUIRED = ("format", "version", "method", "config", "model", "guide", "history", "rng")


def read_run(path: str | os.PathLike[str], *, map_location: Any = None) -> SavedRun:
    """Read a saved run with ``torch.load(weights_only=True)``; a missing, truncated, corrupt
    or foreign file raises :class:`CheckpointError` naming the file and what is wrong."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no saved run at {source}")
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{source} is not a readable hierbayes run (truncated or corrupt?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a hierbayes run (no {FORMAT!r} format tag)")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{source} is incomplete: it lacks {missing}")
    if int(state["version"]) > VERSION:
        raise CheckpointError(
            f"{source} was written by a newer hierbayes (format version {state['version']}; "
            f"this one reads up to {VERSION})"
        )
    return SavedRun(source, state)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float64`` as ``"float64"`` (strings keep the file free of pickled objects)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's configuration with the dtype as a string; a callable option cannot be saved."""
    plain: dict[str, Any] = {}
    for key, value in config.items():
        if key == "dtype":
            plain[key] = dtype_name(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        elif isinstance(value, torch.Tensor):  # per-parameter step sizes given as a start
            plain[key] = value.detach().cpu().tolist()
        else:
            raise CheckpointError(
                f"the run's option {key}={value!r} is not a plain value, so the run cannot be "
                "saved: register a custom curvature or method by name and pass the name"
            )
    return plain


def run_state(result: SavableRun) -> dict[str, Any]:
    """The plain dictionary :meth:`FitResult.save` writes (see the module docstring)."""
    guide = result.guide
    model = result.model
    if result.example is None:
        raise CheckpointError("this result has no example task to rebuild its guide from")
    training: dict[str, Any]
    if result.training is not None:
        state = result.training
        training = {
            "optimizer": state.optimizer.state_dict(),
            "scheduler": None if state.scheduler is None else state.scheduler.state_dict(),
            "tasks_rng": state.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
    else:
        training = dict(result.saved_training or {})
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": result.method,
        "config": _plain_config(result.config),
        "model": {
            "constructor": describe_model(model),
            "state": model.state_dict() if isinstance(model, torch.nn.Module) else {},
            "param_store": param_store_values(
                tuple(
                    name
                    for name in guide.structure.param_sites
                    if name not in guide.structure.module_param_sites
                )
            ),
        },
        "guide": {
            "state": guide.state_dict(),
            "global_sites": [site.name for site in guide.structure.global_sites],
            "task_site": guide.structure.task_site,
            "num_params": guide.structure.num_params,
            "example_x": result.example[0].detach().cpu(),
            "example_y": result.example[1].detach().cpu(),
        },
        "history": [float(v) for v in result.history],
        "wall_time": float(result.wall_time),
        "rng": training,
    }


#: Settings that must agree between a checkpoint and the fit call that resumes it.
RUN_SETTINGS = (
    "method",
    "meta_batch_size",
    "inner_steps",
    "step_size",
    "learn_step_size",
    "first_order",
    "inner_objective",
    "inner_loss",
    "lr",
    "seed",
    "dtype",
)


def check_compatible(saved: SavedRun, config: Mapping[str, Any], guide: Any) -> None:
    """Refuse to resume or load into a run whose settings or model differ from the file's."""
    old = saved.config
    new = _plain_config({k: v for k, v in config.items() if k != "device"})
    keys = set(RUN_SETTINGS) | ({k for k in old if k not in _RUN_ONLY} & set(new))
    differ = {
        k: (old.get(k), new.get(k))
        for k in sorted(keys)
        if k not in _RUN_ONLY and old.get(k) != new.get(k)
    }
    if differ:
        listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"{saved.path} was written by a run with other settings ({listed})")
    g = saved.state["guide"]
    sites = [site.name for site in guide.structure.global_sites]
    if list(g["global_sites"]) != sites or int(g["num_params"]) != guide.structure.num_params:
        raise CheckpointError(
            f"{saved.path} was written for a model with global sites {list(g['global_sites'])} "
            f"and {g['num_params']} per-task parameters; this model has {sites} and "
            f"{guide.structure.num_params}"
        )


_RUN_ONLY = ("meta_steps", "device", "num_tasks")


def load_states(result: SavableRun, saved: SavedRun) -> None:
    """Put the file's model and guide state into ``result``'s model and guide; a model built
    otherwise is refused with what differs (:func:`state_mismatch`)."""
    state = saved.state
    model = result.model
    found = (
        state_mismatch(state["model"]["state"], model) if isinstance(model, torch.nn.Module) else []
    )
    found += [f"guide: {line}" for line in state_mismatch(state["guide"]["state"], result.guide)]
    if found:
        old, new = state["model"].get("constructor"), describe_model(model)
        if old is not None and new is not None:
            differ = [
                f"{k}: saved {old['kwargs'].get(k, '(default)')!r}, this model "
                f"{new['kwargs'].get(k, '(default)')!r}"
                for k in sorted(set(old["kwargs"]) | set(new["kwargs"]))
                if old["kwargs"].get(k, "(default)") != new["kwargs"].get(k, "(default)")
            ]
            if old["class"] != new["class"]:
                differ.insert(0, f"class: saved {old['class']}, this model {new['class']}")
            found.append("constructor arguments: " + ("; ".join(differ) or "the same"))
        raise CheckpointError(
            f"{saved.path} does not fit this model:\n  "
            + "\n  ".join(found)
            + "\nBuild the model as it was built for training and pass it in."
        )
    try:
        if isinstance(model, torch.nn.Module):
            model.load_state_dict(state["model"]["state"])
        result.guide.load_state_dict(state["guide"]["state"])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{saved.path} does not fit this model: {err}") from err
    if result.example is not None:
        restore_param_store(model, result.example, state["model"]["param_store"])
    result.history = [float(v) for v in state["history"]]
    result.wall_time = float(state.get("wall_time", 0.0))


def state_mismatch(saved: Mapping[str, Tensor], module: torch.nn.Module) -> list[str]:
    """What keeps ``module.load_state_dict(saved)`` from working: each tensor whose shape
    differs (saved, then current), the module's keys the file lacks and the file's keys the
    module lacks, one line each; empty when they fit."""
    current = module.state_dict()
    found = [
        f"{k}: saved {tuple(v.shape)}, this model {tuple(current[k].shape)}"
        for k, v in saved.items()
        if k in current and tuple(v.shape) != tuple(current[k].shape)
    ]
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        found.append("this model has parameters the saved run lacks: " + ", ".join(missing))
    if unexpected:
        found.append("the saved run has parameters this model lacks: " + ", ".join(unexpected))
    return found


def restore_run(result: SavableRun, saved: SavedRun) -> None:
    """Resume: the file's model, guide, history, optimiser, schedule and generators into the
    freshly built run ``result`` (after checking it was written by the same settings)."""
    check_compatible(saved, result.config, result.guide)
    load_states(result, saved)
    rng = saved.state["rng"]
    if result.training is None or "optimizer" not in rng:
        raise CheckpointError(f"{saved.path} holds no optimiser state to resume from")
    try:
        result.training.optimizer.load_state_dict(rng["optimizer"])
        if result.training.scheduler is not None:
            if rng.get("scheduler") is None:
                raise CheckpointError(f"{saved.path} holds no learning-rate schedule state")
            result.training.scheduler.load_state_dict(rng["scheduler"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"{saved.path}: the optimiser state does not fit this run's optimiser ({err})"
        ) from err
    result.training.generator.set_state(rng["tasks_rng"])
    torch.set_rng_state(rng["torch_rng"])
