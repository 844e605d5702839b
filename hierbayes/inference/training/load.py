r"""``hierbayes.load``: a saved run back as a :class:`~hierbayes.inference.FitResult`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.training.methods import get_method
from hierbayes.inference.training.persistence import (
    _RUN_ONLY,
    BUILTIN_MODELS,
    CheckpointError,
    load_states,
    read_run,
)
from hierbayes.inference.training.result import FitResult

__all__ = ["load", "rebuild_model"]

#: ``fit``'s own settings kept in a run's config that are not options of the objective: the
#: full-batch optimiser, the convergence tolerances, where the hyperprior is scored.
FIT_SETTINGS = ("full_batch", "grad_tolerance", "loss_tolerance", "hyperprior_space")

_GUIDE_OPTIONS = (
    "inner_steps",
    "step_size",
    "learn_step_size",
    "first_order",
    "inner_objective",
    "inner_loss",
    "gradient_checkpointing",
)


def load(
    path: str | os.PathLike[str], model: Any = None, *, device: str | torch.device | None = None
) -> FitResult:
    r"""Read a run that :meth:`FitResult.save` (or a ``fit`` checkpoint) wrote.

    Parameters
    ----------
    path:
        The file. It is read with ``torch.load(weights_only=True)``: no arbitrary pickles.
    model:
        The model, built as it was for training. Needed for a Pyro function or a ``TaskModel``
        around a network of your own; a built-in model (``NeuralRegression``,
        ``BayesianLinearRegression``) is constructed from the file when omitted.
    device:
        Where to put the result (default: where it was trained, if available here).

    Returns
    -------
    FitResult
        Adapts and predicts exactly as the saved one did. To train it further, pass the file
        to ``fit(..., resume=path)``.
    """
    saved = read_run(path, map_location="cpu")
    state = saved.state
    config = saved.config
    dtype = dtype_from_name(config.get("dtype"))
    if model is None:
        model = rebuild_model(state["model"]["constructor"], saved.path)
    target = torch.device(device if device is not None else config.get("device", "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        target = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        model.to(device=target, dtype=dtype)
    g = state["guide"]
    example = (g["example_x"].to(target), g["example_y"].to(target))
    options = {k: config[k] for k in _GUIDE_OPTIONS if k in config}
    guide = TruncatedGradientGuide(model, example, **options)
    guide.to(device=target, dtype=dtype)
    method = get_method(str(state["method"]))
    method_options = {
        k: v
        for k, v in config.items()
        if k
        not in (
            *_GUIDE_OPTIONS,
            *_RUN_ONLY,
            *FIT_SETTINGS,
            "method",
            "meta_batch_size",
            "lr",
            "seed",
            "dtype",
        )
    }
    objective = method.objective(num_tasks=config.get("num_tasks"), **method_options)
    objective.bind(guide.density)
    objective.hyperprior_space = config.get("hyperprior_space", "constrained")
    config = {**config, "dtype": dtype, "device": str(target)}
    result = FitResult(model, guide, objective, method.name, [], config, example=example)
    load_states(result, saved)
    result.saved_training = dict(state["rng"])
    return result


def rebuild_model(description: Mapping[str, Any] | None, path: Path) -> Any:
    """The built-in model a description names, or a :class:`CheckpointError` saying how to pass
    the model back in."""
    if description is None:
        raise CheckpointError(
            f"{path} holds a run of a model hierbayes cannot construct by itself (a Pyro "
            "function or a TaskModel around your own network): build the model as you did for "
            f"training and pass it in, hierbayes.load({str(path)!r}, model=model)"
        )
    return BUILTIN_MODELS[str(description["class"])](**dict(description["kwargs"]))


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in a saved run")
    return dtype
