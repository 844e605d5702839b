r"""``fit``'s settings as three frozen dataclasses: the guide's inner loop, the optimiser, the run.

.. code-block:: python

    fit(model, tasks, method="llama",
        guide=GuideConfig(inner_steps=5, step_size=0.01, learn_step_size="per_parameter"),
        optim=OptimConfig(algorithm="adam", lr=1e-3, meta_batch_size=25),
        run=RunConfig(meta_steps=20_000, seed=0, checkpoint="runs/ckpt.pt"),
        objective="evidence", curvature="ggn")

Every field is checked when the config is built, with an error that names it. Each field may
also be passed to ``fit`` as a keyword of its own (``fit(model, tasks, meta_steps=500,
step_size=0.1)``): a shortcut routed to the config that holds it; a field given both ways is
an error. What is not a field of the three configs goes to the method's objective
(``curvature=``, ``objective=``, ``hyperprior_space=`` ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hierbayes.inference.core.inner_loop import InnerLoss
from hierbayes.inference.guide import InnerObjective, StepSizeMode, TruncatedGradientGuide

__all__ = [
    "GuideConfig",
    "OptimConfig",
    "RunConfig",
    "config_fields",
    "split_options",
]

Algorithm = Literal["auto", "adam", "lbfgs"]
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Callback = Callable[[int, float, Any], None]


def _whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}; got {value!r}")


def _positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        names = [repr(a) for a in allowed]
        listed = ", ".join(names[:-1]) + f" or {names[-1]}"
        raise ValueError(f"{name} must be {listed}; got {value!r}")


@dataclass(frozen=True)
class GuideConfig:
    r"""The truncated-gradient guide's inner loop
    (:class:`~hierbayes.inference.TruncatedGradientGuide`).

    Attributes
    ----------
    inner_steps:
        :math:`k`, gradient steps from the prior mean on each task's support set.
    step_size:
        :math:`\alpha`: a number, or a ``(D,)`` tensor of per-parameter steps (a fixed
        preconditioner, or the start of learned ones).
    learn_step_size:
        ``"fixed"`` (MAML), ``"scalar"`` or ``"per_parameter"`` (Meta-SGD).
    first_order:
        Detach the inner gradients (first-order MAML).
    inner_objective:
        ``"likelihood"`` or ``"joint"`` (adds :math:`\log p(\phi\mid\theta)` to the step).
    inner_loss:
        ``"sum"``, ``"mean"`` or ``"mse"`` (what each step climbs).
    gradient_checkpointing:
        Recompute each inner step in the backward pass (less memory, same meta-gradient).
    """

    inner_steps: int = 1
    step_size: float | Tensor = 0.01
    learn_step_size: StepSizeMode = "fixed"
    first_order: bool = False
    inner_objective: InnerObjective = "likelihood"
    inner_loss: InnerLoss = "sum"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _whole("inner_steps", self.inner_steps, 0)
        if isinstance(self.step_size, Tensor):
            ok = self.step_size.numel() > 0 and bool(
                (self.step_size.isfinite() & (self.step_size > 0)).all()
            )
            if not ok:
                raise ValueError("step_size must hold finite positive step sizes; some are not")
        else:
            _positive("step_size", self.step_size)
        _choice("learn_step_size", self.learn_step_size, ("fixed", "scalar", "per_parameter"))
        _choice("inner_objective", self.inner_objective, ("likelihood", "joint"))
        _choice("inner_loss", self.inner_loss, ("sum", "mean", "mse"))
        if self.inner_loss == "mse" and self.inner_objective == "joint":
            raise ValueError(
                "inner_loss='mse' is MAML's likelihood-only step; use inner_loss='mean' with "
                "inner_objective='joint'"
            )

    def options(self) -> dict[str, Any]:
        """The guide's keyword options."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def of(cls, guide: TruncatedGradientGuide) -> GuideConfig:
        """The inner-loop settings a built guide carries (a run records them)."""
        step = guide.step_size.detach()
        per_parameter = step.numel() > 1 or guide.learn_step_size == "per_parameter"
        return cls(
            inner_steps=guide.inner_steps,
            step_size=step.clone() if per_parameter else float(step),
            learn_step_size=guide.learn_step_size,
            first_order=guide.first_order,
            inner_objective=guide.inner_objective,
            inner_loss=guide.inner_loss,
            gradient_checkpointing=guide.gradient_checkpointing,
        )


@dataclass(frozen=True)
class OptimConfig:
    r"""The meta-optimiser.

    Attributes
    ----------
    algorithm:
        ``"adam"`` (stochastic: ``meta_batch_size`` tasks a step), ``"lbfgs"`` (deterministic,
        full batch: every task every iteration, strong-Wolfe line search; a finite task set), or
        ``"auto"`` (the default): L-BFGS for an evidence objective on a finite task set without
        a query set (groups as tasks: empirical Bayes), Adam otherwise.
    lr:
        Adam's learning rate.
    meta_batch_size:
        Tasks a stochastic step (the global batch in a distributed run).
    optimizer:
        ``optimizer(parameters) -> torch.optim.Optimizer`` instead of Adam (stochastic runs).
    lr_scheduler:
        ``lr_scheduler(optimizer) -> LRScheduler``, stepped once per meta-step.
    clip_grad_norm:
        Clip the meta-gradient's norm to this value.
    grad_tolerance, loss_tolerance:
        The convergence criterion, reported in ``FitResult.convergence``: converged means the
        gradient norm (every trained parameter, unconstrained) is at most ``grad_tolerance``;
        an L-BFGS run also stops (unconverged, with the reason) when the loss changes by at
        most ``loss_tolerance`` (relative) in an iteration.
    """

    algorithm: Algorithm = "auto"
    lr: float = 1e-3
    meta_batch_size: int = 25
    optimizer: OptimizerFactory | None = None
    lr_scheduler: SchedulerFactory | None = None
    clip_grad_norm: float | None = None
    grad_tolerance: float = 1e-6
    loss_tolerance: float = 1e-12

    def __post_init__(self) -> None:
        _choice("algorithm", self.algorithm, ("auto", "adam", "lbfgs"))
        _positive("lr", self.lr)
        _whole("meta_batch_size", self.meta_batch_size, 1)
        if self.clip_grad_norm is not None:
            _positive("clip_grad_norm", self.clip_grad_norm)
        _non_negative("grad_tolerance", self.grad_tolerance)
        _non_negative("loss_tolerance", self.loss_tolerance)
        if self.algorithm == "lbfgs" and self.optimizer is not None:
            raise ValueError(
                "algorithm='lbfgs' runs L-BFGS with a strong-Wolfe line search; it takes no "
                "optimizer=. Pass one or the other"
            )

    @property
    def full_batch(self) -> bool | None:
        """``True`` for L-BFGS, ``False`` for a stochastic optimiser, ``None`` to choose."""
        if self.algorithm == "lbfgs":
            return True
        if self.algorithm == "adam" or self.optimizer is not None:
            return False
        return None


@dataclass(frozen=True)
class RunConfig:
    r"""How long, where and with what bookkeeping a run goes.

    Attributes
    ----------
    meta_steps:
        The total number of meta-steps (L-BFGS iterations for a full-batch run); a resumed
        run continues up to it.
    seed:
        Seeds torch and the task sampler: a run is reproducible on one device.
    device, dtype:
        Where and in which floating-point type to train.
    progress:
        Show a progress bar.
    callback:
        ``callback(step, loss, result)`` after every meta-step.
    checkpoint, checkpoint_every:
        Write the run there (atomically) every ``checkpoint_every`` steps, at the end, and
        when it is interrupted or diverges.
    resume:
        A checkpoint to continue from (the same settings; a fresh model).
    metrics_log:
        Append one JSON line per meta-step.
    log_every:
        Log progress to the logger ``"hierbayes.fit"`` every this many steps.
    check_every:
        Check the inner loop every this many steps (``0``: never).
    distributed:
        Data-parallel training over a ``torch.distributed`` launch: ``None`` (on with more
        than one rank), ``True``, ``False``.
    """

    meta_steps: int = 1000
    seed: int = 0
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None
    progress: bool = True
    callback: Callback | None = None
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    resume: str | os.PathLike[str] | None = None
    metrics_log: str | os.PathLike[str] | None = None
    log_every: int = 100
    check_every: int = 250
    distributed: bool | None = None

    def __post_init__(self) -> None:
        _whole("meta_steps", self.meta_steps, 0)
        _whole("seed", self.seed, 0)
        _whole("log_every", self.log_every, 0)
        _whole("check_every", self.check_every, 0)
        if self.dtype is not None and not (
            isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point
        ):
            raise ValueError(
                f"dtype must be a floating-point torch.dtype or None; got {self.dtype!r}"
            )
        if self.checkpoint_every is not None:
            if self.checkpoint is None:
                raise ValueError("checkpoint_every needs checkpoint=PATH, where to write them")
            _whole("checkpoint_every", self.checkpoint_every, 1)
        _choice("distributed", self.distributed, (None, True, False))


_CONFIGS: tuple[type[Any], ...] = (GuideConfig, OptimConfig, RunConfig)


def config_fields() -> dict[str, type[Any]]:
    """Every config field by name, with the config that holds it."""
    return {f.name: cls for cls in _CONFIGS for f in dataclasses.fields(cls)}


def split_options(
    options: Mapping[str, Any],
    guide: GuideConfig | None,
    optim: OptimConfig | None,
    run: RunConfig | None,
) -> tuple[GuideConfig, OptimConfig, RunConfig, dict[str, Any]]:
    """The three configs with ``fit``'s keyword shortcuts routed into them, and the options
    left for the method's objective.

    Raises
    ------
    TypeError
        A field given both in its config and as a keyword, or a config of the wrong type.
    """
    given: dict[type[Any], Any] = {GuideConfig: guide, OptimConfig: optim, RunConfig: run}
    for cls, value in given.items():
        if value is not None and not isinstance(value, cls):
            name = {GuideConfig: "guide", OptimConfig: "optim", RunConfig: "run"}[cls]
            raise TypeError(f"{name}= takes a {cls.__name__}; got {type(value).__name__}")
    fields = config_fields()
    routed: dict[type[Any], dict[str, Any]] = {cls: {} for cls in _CONFIGS}
    rest: dict[str, Any] = {}
    for key, value in options.items():
        holder = fields.get(key)
        if holder is None:
            rest[key] = value
            continue
        cls = holder
        if given[cls] is not None:
            raise TypeError(
                f"fit got {key}= both as a keyword and in its {cls.__name__}: give it once "
                f"({cls.__name__}({key}=...) or the keyword)"
            )
        else:
            routed[cls][key] = value
    built = {cls: given[cls] if given[cls] is not None else cls(**routed[cls]) for cls in _CONFIGS}
    return built[GuideConfig], built[OptimConfig], built[RunConfig], rest
