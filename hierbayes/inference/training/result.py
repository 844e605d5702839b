r"""What :func:`~hierbayes.inference.fit` returns: a plain result object."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

from hierbayes.errors import HierbayesError, TaskDataError
from hierbayes.inference.core.laplace import prior_precision
from hierbayes.inference.core.mode import newton_mode
from hierbayes.inference.core.mode_report import ModeReport
from hierbayes.inference.diagnostics.metrics import TaskMetrics, evaluate_posterior
from hierbayes.inference.guide import TruncatedGradientGuide
from hierbayes.inference.objectives import (
    LaplaceEvidenceObjective,
    LaplaceObjective,
    MetaObjective,
)
from hierbayes.inference.posteriors.base import TaskPosterior
from hierbayes.inference.predictions import Prediction
from hierbayes.inference.training.checks import check_support
from hierbayes.inference.training.convergence import Convergence
from hierbayes.inference.training.persistence import run_state, write_atomic
from hierbayes.models.structure import check_inputs
from hierbayes.tasks.batch import TaskBatch

__all__ = [
    "FitResult",
    "MetaTrainingDiverged",
    "MetaTrainingInterrupted",
    "TrainingState",
]

#: ``adapt`` warns when an objective that assumed a mode gets a centre farther than this from
#: it, in posterior standard deviations (:math:`\sqrt{g^\top\hat H^{-1}g}`).
_MODE_DISTANCE = 0.5
#: The Newton decrement (nats) at which ``adapt(refine=...)`` stops for other objectives.
_MODE_TOLERANCE = 1e-4
#: ``adapt``'s default budget of Newton steps for an objective that assumed a mode (it stops
#: earlier once every task is within the objective's ``mode_tolerance``).
_ADAPT_MODE_STEPS = 20


class MetaTrainingDiverged(HierbayesError, FloatingPointError):
    """The meta-objective became NaN or infinite; ``result`` holds the last finite state."""

    def __init__(self, message: str, result: FitResult) -> None:
        super().__init__(message)
        self.result = result


class MetaTrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`~hierbayes.inference.fit`; ``result`` holds the steps completed
    (and, when ``fit`` had a ``checkpoint``, the run was written there first). It is a
    ``KeyboardInterrupt``, so code that catches those still does."""

    def __init__(self, message: str, result: FitResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class TrainingState:
    """The live optimiser, learning-rate schedule and task sampler's generator of a run."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model and guide, the loss history, and methods to
    adapt to new tasks and predict.

    Attributes
    ----------
    model, guide, objective:
        The model, its trained :class:`~hierbayes.inference.TruncatedGradientGuide`, and the
        meta-objective.
    method:
        The method's name (``"maml"``, ``"llama"``, ...).
    history:
        The meta-objective at each meta-step.
    config:
        The settings of the run (steps, batch size, seed, device, ...).
    """

    model: Any
    guide: TruncatedGradientGuide
    objective: MetaObjective
    method: str
    history: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    #: One task's support data, to trace the model on when the guide is rebuilt from a file.
    example: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    #: The optimiser, schedule and task generator of the run (``None`` for a loaded result).
    training: TrainingState | None = field(default=None, repr=False)
    #: The optimiser's, schedule's and generators' saved state, for a loaded result.
    saved_training: dict[str, Any] | None = field(default=None, repr=False)
    #: How the run ended: converged or not, why, the gradient norm and the last relative
    #: change of the loss (:class:`~hierbayes.inference.training.empirical_bayes.Convergence`;
    #: ``None`` for a loaded result).
    convergence: Convergence | None = field(default=None, repr=False)
    #: The mode search's report of the last meta-step (objectives evaluated at each task's
    #: mode: ``steps``, per task ``converged``, ``decrement``, ``gradient_norm``, ``failed``);
    #: ``None`` for other objectives.
    mode_report: ModeReport | None = field(default=None, repr=False)

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild, adapt with, and resume this run, as plain containers
        of tensors, numbers and strings (``torch.load(weights_only=True)`` reads it)."""
        return run_state(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the run to ``path`` atomically; read it back with :func:`hierbayes.load`, or
        continue it with ``fit(..., resume=path)``."""
        return write_atomic(self.state_dict(), path)

    @property
    def params(self) -> dict[str, Tensor]:
        """Point estimates of the global latents (``theta``, ``noise_scale``, ...), and the
        current values of a function model's ``pyro.param`` sites (kept in Pyro's parameter
        store, shared by name: fitting the same function model again replaces them)."""
        values = {k: v.detach() for k, v in self.guide.global_values().items()}
        own: set[int] = set()
        if isinstance(self.model, torch.nn.Module):
            # a module's parameters by their attribute names (not Pyro's instance-numbered ones)
            own = {id(p) for p in self.model.parameters()}
            for name, value in _module_param_values(self.model).items():
                values.setdefault(name, value)
        store = pyro.get_param_store()
        for name in self.guide.structure.param_sites:
            if name in store and name not in values:
                value = store.get_param(name)
                if id(value.unconstrained()) not in own:  # type: ignore[attr-defined]
                    values[name] = value.detach()
        return values

    @property
    def theta(self) -> Tensor:
        r""":math:`\hat\theta`, the meta-learned initialisation / prior mean."""
        params = self.params
        if "theta" in params:
            return params["theta"]
        raise KeyError("the model has no global site or parameter named 'theta'")

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.get("device", "cpu"))

    def adapt(
        self,
        support_x: TaskBatch | Tensor,
        support_y: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        inner_steps: int | None = None,
        step_size: float | None = None,
        refine: int | None = None,
    ) -> TaskPosterior:
        r"""The task posterior of each new task given its support set.

        Pass a :class:`~hierbayes.tasks.TaskBatch` (its support set is used) or
        ``support_x`` ``(T, N, ...)``, ``support_y`` and an optional mask. ``inner_steps``
        overrides the number of inner steps for this call (``0``: no adaptation, the
        posterior sits at the prior mean :math:`\hat\theta`), and ``step_size`` a fixed step.

        ``refine=k`` takes up to ``k`` damped, monotone Newton steps
        :math:`\phi \leftarrow \phi + \alpha\hat H^{-1}\nabla_\phi\log p(\mathcal D^s_j,
        \phi\mid\theta)` from the guide's :math:`\hat\phi_j` before the posterior is built
        (a step that would lower the log joint is halved, up to ten times, then rejected;
        :func:`~hierbayes.inference.core.mode.newton_mode`), with the objective's curvature
        (the GGN for MAML): a Laplace posterior :math:`\mathcal N(\phi^*_j, \hat H_j^{-1})`
        is then centred at the mode of the support log joint, and a point mass at the MAP.
        The default, for an objective that evaluated its Laplace evidence at a mode
        (``objective="evidence"``), is up to 20 steps (or its ``mode_steps`` if more), ending
        once every task is within its ``mode_tolerance``; for other objectives it is ``0``
        (the guide's :math:`\hat\phi_j` as trained).

        For such an objective the returned centre is checked: where a task's centre lies more
        than half a posterior standard deviation from the mode
        (:math:`\sqrt{g^\top\hat H^{-1}g} > 0.5`, :math:`g` the gradient of the support log
        joint), a :class:`UserWarning` names the tasks, their distance and gradient norm, and
        suggests a larger ``refine``.
        """
        if isinstance(support_x, TaskBatch):
            batch = support_x
        else:
            if support_y is None:
                raise TaskDataError("adapt needs support_y, the targets of the support set")
            batch = TaskBatch(support_x, support_y, support_mask=mask)
        batch = batch.to(self.device, dtype=self.config.get("dtype"))
        check_inputs(self.guide.structure, batch.support_x, "support_x")
        if step_size is not None and (self.guide.learn_step_size != "fixed" or not step_size > 0):
            raise ValueError("step_size can be overridden only for a fixed, positive step size")
        with torch.no_grad():
            params = self.guide.global_values()
            try:
                phi = self.guide.adapt(
                    params,
                    batch.support_x,
                    batch.support_y,
                    batch.support_mask,
                    inner_steps=inner_steps,
                    step_size=step_size,
                )
            except ValueError as err:  # a value outside the likelihood's support, named
                self._check_support(params, "support_y", batch, err)
                raise
        phi = self._refine(params, phi, batch, refine)
        return self.objective.posterior(self.guide.density, params, phi, batch)

    def _refine(
        self, params: dict[str, Tensor], phi: Tensor, batch: TaskBatch, refine: int | None
    ) -> Tensor:
        """``adapt``'s Newton refinement of ``phi`` ``(T, D)`` on the support set, and the check
        that an objective which assumed a mode is handed one (see ``adapt``)."""
        objective = self.objective
        assumes_mode = isinstance(objective, LaplaceEvidenceObjective)
        if refine is None:
            refine = (
                max(objective.mode_steps, _ADAPT_MODE_STEPS)
                if isinstance(objective, LaplaceEvidenceObjective)
                else 0
            )
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be a number of Newton steps >= 0; got {refine!r}")
        if refine == 0 and not assumes_mode:
            return phi
        density = self.guide.density
        curvature, damping = (
            (objective.curvature_for(density), objective.damping)
            if isinstance(objective, LaplaceObjective)
            else ("ggn", None)
        )
        search = newton_mode(
            density,
            params,
            phi,
            batch.support_x,
            batch.support_y,
            batch.support_mask,
            precision=prior_precision(density, params, phi.shape[0], damping=damping),
            curvature=curvature,
            steps=refine,
            tolerance=(
                objective.mode_tolerance
                if isinstance(objective, LaplaceEvidenceObjective)
                else _MODE_TOLERANCE
            ),
            create_graph=False,
        )
        if assumes_mode:
            distance = search.distance
            far = distance > _MODE_DISTANCE
            if bool(far.any()):
                worst = int(distance.argmax())
                warnings.warn(
                    f"the {self.method!r} objective {objective.name!r} evaluated its Laplace "
                    f"evidence at each task's mode, but adapt(refine={refine}) returns centres "
                    f"away from the mode of the support log joint for {int(far.sum())} of "
                    f"{phi.shape[0]} tasks (worst: task {worst}, "
                    f"{float(distance[worst]):.3g} posterior standard deviations away, gradient "
                    f"norm {float(search.gradient_norm[worst]):.3g}); pass "
                    f"refine={max(2 * refine, 5)} to adapt to centre the posterior at the mode",
                    UserWarning,
                    stacklevel=3,
                )
        return search.phi

    def predict(self, batch: TaskBatch, x: Tensor | None = None, **kwargs: Any) -> Prediction:
        """Adapt to ``batch``'s support sets and predict at ``x`` (default: its query inputs)."""
        posterior = self.adapt(batch)
        if x is None:
            x, _, _ = batch.require_query("predict without x")
        check_inputs(self.guide.structure, x, "x")
        return posterior.predict(self._move(x), **kwargs)

    def _move(self, t: Tensor) -> Tensor:
        dtype = self.config.get("dtype")
        if dtype is not None and torch.is_floating_point(t):
            return t.to(device=self.device, dtype=dtype)
        return t.to(self.device)

    def evaluate(
        self,
        batch: TaskBatch,
        levels: tuple[float, ...] = (0.5, 0.9),
        *,
        inner_steps: int | None = None,
        step_size: float | None = None,
        chunk_size: int = 200,
        **kwargs: Any,
    ) -> TaskMetrics:
        """Per-task query metrics (MSE, NLL per point, interval coverage) after adaptation.

        Tasks are adapted and scored ``chunk_size`` at a time (bounded memory); other keywords
        go to the posterior's ``predict`` (e.g. ``method="sampled"`` for Laplace posteriors).
        """
        parts = []
        for start in range(0, batch.num_tasks, chunk_size):
            chunk = batch.select(slice(start, start + chunk_size))
            posterior = self.adapt(chunk, inner_steps=inner_steps, step_size=step_size)
            moved = chunk.to(self.device, dtype=self.config.get("dtype"))
            try:
                parts.append(evaluate_posterior(posterior, moved, levels=levels, **kwargs))
            except ValueError as err:  # a query target outside the likelihood's support
                self._check_support(posterior.params, "query_y", moved, err)
                raise
        return TaskMetrics.concat(parts)

    def _check_support(
        self, params: Mapping[str, Tensor], field: str, batch: TaskBatch, err: ValueError
    ) -> None:
        """Raise a :class:`TaskDataError` naming the task and point when ``err`` came from a
        ``field`` value outside the observed site's support (else return: ``err`` is raised)."""
        if isinstance(err, TaskDataError):
            return
        if field == "support_y":
            x, y, mask = batch.support_x, batch.support_y, batch.support_mask
        else:
            x, y, mask = batch.require_query("evaluation")
        check_support(self.guide, params, field, x, y, mask, batch.task_ids, cause=err)


def _module_param_values(model: torch.nn.Module) -> dict[str, Tensor]:
    """A module model's own learnable values by their short names, constrained where they are
    ``PyroParam`` s (read outside any Pyro context: the plain constrained value)."""
    values: dict[str, Tensor] = {}
    for name, _ in model.named_parameters():
        short = name.removesuffix("_unconstrained")
        owner: Any = model
        *path, leaf = short.split(".")
        for part in path:
            owner = getattr(owner, part)
        values[short] = getattr(owner, leaf).detach()
    return values
