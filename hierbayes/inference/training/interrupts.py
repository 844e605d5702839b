r"""Ctrl-C at a step boundary: what an interrupted run saves is the state between two steps.

A real SIGINT lands at an arbitrary bytecode: after the task sampler drew the next batch, in
the middle of the optimiser's update, between the update and the history's append. Saving the
run there and resuming would not take the steps an uninterrupted run takes. So a meta-step has
two phases:

* **computing** (sample a batch, the loss, its gradient): interruptible at once. The state it
  changed is the random generators' (the task sampler's and torch's global one, which a sampled
  predictive draws from) and the gradients; :class:`StepSnapshot` restores the generators and
  the gradients are cleared, so the run is back at the boundary before the step;
* **committing** (the optimiser's and the schedule's step, the history, the metrics log, a
  periodic checkpoint): a critical section. A SIGINT inside it is deferred to its end, so the
  step is either taken whole or not at all.

:class:`InterruptGuard` installs the SIGINT handler that does this (in the main thread only,
restoring the previous handler afterwards; elsewhere Python delivers no signal, and a
``KeyboardInterrupt`` raised by code is handled the same way by the phase it lands in).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import Tensor

__all__ = ["InterruptGuard", "StepSnapshot"]


@dataclass(frozen=True)
class StepSnapshot:
    """The random generators' states at a step boundary (cheap: a few kilobytes)."""

    tasks: Tensor
    torch_cpu: Tensor
    cuda: tuple[Tensor, ...]

    @classmethod
    def take(cls, generator: torch.Generator) -> StepSnapshot:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(generator.get_state(), torch.get_rng_state(), cuda)

    def restore(self, generator: torch.Generator) -> None:
        generator.set_state(self.tasks)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(list(self.cuda))


class InterruptGuard:
    """SIGINT raises ``KeyboardInterrupt`` at once, except inside :meth:`critical`, where it is
    deferred to the section's end. Use as a context manager around the loop."""

    def __init__(self) -> None:
        self._critical = 0
        self._pending = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except ValueError:  # not the main interpreter: no signals reach us
                self._installed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._critical:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A section a SIGINT does not cut: one that arrives inside is raised at its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if not self._critical and self._pending:
                self._pending = False
                raise KeyboardInterrupt
