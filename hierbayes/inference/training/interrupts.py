r"""Ctrl-C at a step boundary: what an interrupted run saves is the state between two steps.

A real SIGINT lands at an arbitrary bytecode: after the task sampler drew the next batch, in
the middle of the optimiser's update, between the update and the history's append, or inside
Pyro's or torch's own context managers. Raised there as an exception it would leave the run
between two steps, and, worse, the process itself broken: a ``KeyboardInterrupt`` inside a
plate's ``__enter__`` leaves the plate on Pyro's handler stack with its dimension taken (its
``__exit__`` never runs), and every later model run in the process fails with "duplicate plate".
So a SIGINT never raises where it lands; :class:`InterruptGuard` notes it, and the loop raises
it at points it chose (:meth:`InterruptGuard.poll`), where a step has two phases:

* **computing** (sample a batch, the inner-loop check, the loss, its gradient): the loop polls
  after each part, so a Ctrl-C takes effect within one forward and backward pass. The state it
  changed is the random generators' (the task sampler's and torch's global one, which a sampled
  predictive draws from) and the gradients; :class:`StepSnapshot` restores the generators and
  the gradients are cleared, so the run is back at the boundary before the step;
* **committing** (the optimiser's and the schedule's step, the history, the metrics log, a
  periodic checkpoint): a critical section (:meth:`InterruptGuard.critical`) at whose end a
  SIGINT that came inside is raised, so the step is taken whole or not at all.

A second Ctrl-C while the first waits for a poll (a long forward pass) raises at once: the
user insists, and gets the run as it stood before the step (the process's Pyro state may then
be left inconsistent, as with any exception raised inside a library). Inside a critical section,
and while an interrupted run is saved (:meth:`InterruptGuard.shielded`), every further Ctrl-C
waits for the section's end.

The handler is installed in the main thread only, and the previous one is restored afterwards
(elsewhere Python delivers no signal; a ``KeyboardInterrupt`` raised by code is an ordinary
exception, handled the same way by the phase it comes from).
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
    """Notes a SIGINT instead of raising it where it lands; :meth:`poll` and the end of
    :meth:`critical` raise it (see the module docstring). Use as a context manager around the
    loop: leaving it normally with a SIGINT noted raises it there."""

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

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        if exc_type is None:
            self.poll()  # one that came after the last poll is not lost

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._pending and not self._critical:  # a second Ctrl-C: the user insists
            self._pending = False
            raise KeyboardInterrupt
        self._pending = True

    @property
    def pending(self) -> bool:
        """Whether a SIGINT came that has not been raised yet."""
        return self._pending

    def poll(self) -> None:
        """Raise ``KeyboardInterrupt`` here if a SIGINT came since the last poll (a safe point:
        nothing half-done on any stack)."""
        if self._pending and not self._critical:
            self._pending = False
            raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A section a SIGINT does not cut: one that arrives inside is raised at its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        self.poll()

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """A section a SIGINT does not cut and does not follow: the work of stopping (saving an
        interrupted run), which ends in an exception of its own."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            self._pending = False
