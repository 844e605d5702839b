r"""The meta-training loop: one step of the optimiser per batch of tasks, with guards,
checkpoints, interruption, logging and a metrics log.

Each step: sample a batch (the task sampler's own generator), the objective's fast road
(:meth:`~hierbayes.inference.MetaObjective.meta_loss`), a finite loss and gradient (else
:class:`~hierbayes.inference.MetaTrainingDiverged`, before the step is taken), optional
gradient clipping, the optimiser's and the schedule's step. Every ``check_every`` steps the
inner loop is checked (:func:`~hierbayes.inference.training.guards.check_inner_loop`).

In a data-parallel run (a :class:`~hierbayes.inference.training.distributed.DistributedContext`)
every rank draws the same batch and steps on its share of it; the loss and the gradients are
summed over the ranks (weighted by each share's size) before the guards and the optimiser see
them, the inner-loop check runs on the whole batch on every rank and is agreed on, and only
rank 0 shows progress, logs, and writes checkpoints and the metrics log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hierbayes.errors import NumericalError
from hierbayes.inference.core.mode_report import ModeReport
from hierbayes.inference.training.distributed import DistributedContext
from hierbayes.inference.training.guards import check_inner_loop, check_jump
from hierbayes.inference.training.interrupts import InterruptGuard, StepSnapshot
from hierbayes.inference.training.result import (
    FitResult,
    MetaTrainingDiverged,
    MetaTrainingInterrupted,
)
from hierbayes.tasks.batch import TaskBatch

__all__ = ["TrainingControl", "TrainingRun"]

logger = logging.getLogger("hierbayes.fit")


@dataclass(frozen=True)
class TrainingControl:
    """The options of :func:`~hierbayes.inference.fit` that steer the loop itself."""

    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    clip_grad_norm: float | None = None
    checkpoint: Path | None = None
    checkpoint_every: int | None = None
    metrics_log: Path | None = None
    log_every: int = 100
    check_every: int = 250


class TrainingRun:
    """One run of the loop over ``result``'s guide, objective and training state."""

    def __init__(
        self,
        result: FitResult,
        source: Any,
        control: TrainingControl,
        *,
        dtype: torch.dtype | None,
        device: torch.device,
        progress: bool,
        context: DistributedContext | None = None,
    ) -> None:
        self.result = result
        self.source = source
        self.control = control
        self.dtype = dtype
        self.device = device
        self.context = context
        #: Rank 0 (or the only process): the one that reports and writes.
        self.main = context is None or context.is_main
        self.progress = progress and self.main
        state = result.training
        if state is None:  # pragma: no cover - fit always sets it
            raise RuntimeError("the result has no training state")
        self.optimizer = state.optimizer
        self.scheduler = state.scheduler
        self.generator = state.generator
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]

    # -- the loop --------------------------------------------------------------------------------

    def train(
        self, meta_steps: int, callback: Callable[[int, float, FitResult], None] | None
    ) -> None:
        """Take meta-steps up to ``meta_steps`` (see the module docstring); a Ctrl-C leaves the
        run at a step boundary (:mod:`~hierbayes.inference.training.interrupts`)."""
        result = self.result
        begin = len(result.history)
        started = time.perf_counter() - result.wall_time
        bar = tqdm(
            range(begin, meta_steps),
            disable=not self.progress,
            desc=f"meta-training ({result.method})",
            mininterval=1.0,
            initial=begin,
            total=meta_steps,
        )
        snapshot: StepSnapshot | None = None
        committed = True
        with InterruptGuard() as guard:
            try:
                for step in bar:
                    guard.poll()  # a Ctrl-C in the last callback: the run is at a boundary
                    snapshot, committed = StepSnapshot.take(self.generator), False
                    batch = self._sample()
                    if self.control.check_every and step % self.control.check_every == 0:
                        self._check_inner_loop(step, batch.to(self.device))
                        guard.poll()
                    value, grad_norm, mode = self._step(step, *self._share(batch))
                    guard.poll()  # the last moment to drop the step rather than take it
                    with guard.critical():  # the step is taken whole or not at all
                        self._commit()
                        result.history.append(value)
                        result.mode_report = mode
                        result.wall_time = time.perf_counter() - started
                        self._record(step, value, grad_norm)
                        committed = True
                        every = self.control.checkpoint_every
                        if every and (step + 1) % every == 0 and step + 1 < meta_steps:
                            self._checkpoint()
                    if self.progress and step % 50 == 0:
                        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                    if callback is not None:
                        callback(step, value, result)
                with guard.critical():
                    result.wall_time = time.perf_counter() - started
                    self._checkpoint()
            except KeyboardInterrupt as err:
                with guard.shielded():  # a further Ctrl-C waits for the run to be saved
                    if not committed and snapshot is not None:  # back to the step's start
                        snapshot.restore(self.generator)
                        self.optimizer.zero_grad(set_to_none=True)
                    result.wall_time = time.perf_counter() - started
                    where = self._checkpoint()
                raise MetaTrainingInterrupted(
                    f"meta-training was interrupted after {len(result.history)} meta-steps"
                    + (f"; the run is saved at {where}" if where else "")
                    + " (the exception's .result holds it).",
                    result,
                ) from err
            except MetaTrainingDiverged:
                with guard.shielded():
                    result.wall_time = time.perf_counter() - started
                    self._checkpoint()
                raise
            finally:
                bar.close()
        if self.context is not None:
            self.context.synchronize()  # every rank returns once the final checkpoint is written

    def _sample(self) -> TaskBatch:
        """The step's whole batch (every rank draws the same one), where the source made it."""
        batch: TaskBatch = self.source.sample(
            self.result.config["meta_batch_size"], generator=self.generator, dtype=self.dtype
        )
        return batch

    def _share(self, batch: TaskBatch) -> tuple[TaskBatch, float]:
        """This rank's share of ``batch``, on the device, and its weight in the mean over tasks."""
        if self.context is None:
            return batch.to(self.device), 1.0
        part, weight = self.context.local_batch(batch)
        return part.to(self.device), weight

    def _check_inner_loop(self, step: int, batch: TaskBatch) -> None:
        def check() -> None:
            check_inner_loop(self.result.guide, batch, step)

        context = self.context
        self._guarded(step, check if context is None else lambda: context.agree(check))

    def _guarded(self, step: int, check: Callable[[], None]) -> None:
        try:
            check()
        except NumericalError as err:
            raise MetaTrainingDiverged(f"{err} {_kept(step)}", self.result) from err

    def _step(
        self, step: int, batch: TaskBatch, weight: float
    ) -> tuple[float, float | None, ModeReport | None]:
        """The loss and the meta-gradient of ``batch`` (this rank's share of the meta-batch,
        whose weight in the mean over the meta-batch's tasks is ``weight``), checked and clipped,
        with the gradient norm before clipping and the objective's mode report; :meth:`_commit`
        then takes the step."""
        result = self.result
        self.optimizer.zero_grad(set_to_none=True)
        loss: Tensor | None = None
        mode: ModeReport | None = None
        try:
            evaluated = result.objective.evaluate(result.guide, batch)
            loss, mode = evaluated.loss, evaluated.mode
            value = float(loss.detach())
            cause: NumericalError | None = None
        except NumericalError as err:
            value, cause = float("nan"), err
        if self.context is not None:
            # the guards below see the global loss and gradient, so they stop every rank alike
            if loss is not None and math.isfinite(value):
                loss.backward()
            value = self.context.reduce_step(value, self.parameters, weight)
        if not math.isfinite(value):
            config = result.config
            raise MetaTrainingDiverged(
                f"meta-step {step}: the {result.method} objective is {value}"
                + (f" ({cause})" if cause else "")
                + f". {_kept(step)} Try a smaller step_size (now {config['step_size']}) or lr (now "
                f"{config['lr']}), fewer inner_steps, or float64.",
                result,
            ) from cause
        self._guarded(step, lambda: check_jump(result.history, value, step))
        if self.context is None and loss is not None:
            loss.backward()
        if not _gradients_finite(self.parameters):
            bad = sum(
                1
                for p in self.parameters
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())
            )
            raise MetaTrainingDiverged(
                f"meta-step {step}: the {result.method} objective is finite ({value:.6g}) but its "
                f"gradient holds NaN or infinite values in {bad} parameter tensor(s). "
                f"{_kept(step)} Try float64, a smaller step_size or lr.",
                result,
            )
        grad_norm = None
        if self.control.clip_grad_norm is not None:
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.parameters, self.control.clip_grad_norm)
            )
        return value, grad_norm, mode

    def _commit(self) -> None:
        """The optimiser's and the schedule's step (inside the loop's critical section)."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    # -- what a step leaves behind -----------------------------------------------------------------

    def _record(self, step: int, value: float, grad_norm: float | None) -> None:
        if not self.main:
            return
        every = self.control.log_every
        if every and step % every == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("meta-step %d: loss %.6g", step, value)
        path = self.control.metrics_log
        if path is None:
            return
        row = {
            "step": step,
            "loss": value,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": grad_norm,
            "seconds": round(self.result.wall_time, 6),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def _checkpoint(self) -> Path | None:
        path = self.control.checkpoint
        if path is None or not self.main:
            return None
        self.result.save(path)
        logger.info("checkpoint written to %s", os.fspath(path))
        return path


def _kept(step: int) -> str:
    """Where the parameters in the exception's result stand."""
    if step == 0:
        return "No step was taken: the exception's .result holds the initial state."
    return f"The exception's .result holds the parameters after meta-step {step - 1}."


def _gradients_finite(parameters: list[Tensor]) -> bool:
    """Whether every gradient is finite, with one synchronisation: a sum is NaN or infinite
    when any of its terms is (an overflow of finite terms would only cause a false alarm)."""
    total: Tensor | None = None
    for p in parameters:
        if p.grad is not None:
            s = p.grad.sum()
            total = s if total is None else total + s
    return total is None or bool(torch.isfinite(total))
