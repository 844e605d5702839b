r"""Data-parallel meta-training over the tasks of each meta-batch, on ``torch.distributed``.

Launched with ``torchrun --nproc_per_node=K`` (one process, a *rank*, per GPU or CPU share),
every rank draws the same global meta-batch of :math:`T` tasks from the same seeded generator
and trains on its own contiguous share :math:`S_r` of it (:math:`T_r = |S_r|`; the first
:math:`T \bmod K` ranks take one task more). The meta-objective is a mean over the batch's
tasks plus a term that does not depend on them (the hyperprior's :math:`-\frac1J\log p(\theta)`),

.. math::

    \mathcal L(\theta) = \frac1T\sum_{j=1}^T \ell_j(\theta) + h(\theta)
    = \sum_r \frac{T_r}{T}\Big[\frac1{T_r}\sum_{j\in S_r}\ell_j(\theta) + h(\theta)\Big],

so each rank evaluates the objective on its share, and the loss and every trained parameter's
gradient (θ, the guide's learned step sizes, a model's noise and prior scales, a function
model's ``pyro.param`` sites) are weighted by :math:`T_r/T` and summed over the ranks with one
``all_reduce``. Every rank then holds the single-process loss and meta-gradient (to rounding),
takes the same optimiser step, and stays in step with the others without exchanging parameters.
The parameters are copied from rank 0 once, before the first step (as
``DistributedDataParallel`` does), so ranks whose models were initialised differently agree.

Set-up and failure handling:

* the process group is joined when it exists, and initialised (``env://``, gloo on CPU, NCCL on
  CUDA, device ``cuda:LOCAL_RANK``) when ``torchrun`` started the process and nobody has;
* before the first step the ranks exchange their settings and parameter shapes, and a rank
  that disagrees, or that failed while setting up (a missing file, a bad argument), stops every
  rank with a :class:`DistributedTrainingError` that names the field or the rank;
* collective operations time out after :data:`DEFAULT_TIMEOUT` seconds (environment variable
  ``HIERBAYES_DIST_TIMEOUT``), and a failed or timed-out collective (a rank died or hangs)
  raises :class:`DistributedTrainingError` on the ranks still running;
* a guard that stops the run (a non-finite loss or gradient, a jump, a diverged inner loop)
  is evaluated on reduced values, or agreed on, so it stops every rank at the same step.

References: Li et al. (2020), "PyTorch Distributed: experiences on accelerating data parallel
training", VLDB; Goyal et al. (2017), "Accurate, large minibatch SGD".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from hierbayes.errors import HierbayesError, NumericalError
from hierbayes.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from hierbayes.inference.training.result import FitResult


class StepControl(Protocol):
    """The loop's options every rank must share (the training loop's control)."""

    @property
    def clip_grad_norm(self) -> float | None: ...

    @property
    def check_every(self) -> int: ...


__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_VARIABLE",
    "DistributedContext",
    "DistributedTrainingError",
    "StepControl",
]

logger = logging.getLogger("hierbayes.fit")

#: Seconds a collective operation (and joining the process group) may wait for the other ranks.
DEFAULT_TIMEOUT = 600.0
#: The environment variable that overrides :data:`DEFAULT_TIMEOUT` (seconds).
TIMEOUT_VARIABLE = "HIERBAYES_DIST_TIMEOUT"

T = TypeVar("T")


class DistributedTrainingError(HierbayesError, RuntimeError):
    """A multi-process run that cannot go on: the ranks disagree on the settings, a rank failed
    or died, a collective operation timed out, or the launch is misconfigured."""


@dataclass
class DistributedContext:
    """This rank's place in a data-parallel run, and the collectives the training loop uses.

    Attributes
    ----------
    rank, world_size, local_rank:
        This process's rank, the number of ranks, and its rank on this machine.
    device:
        Where this rank trains (``cuda:LOCAL_RANK`` for ``device="cuda"``).
    backend:
        The process group's backend (``"gloo"`` or ``"nccl"``).
    timeout:
        Seconds a collective waits before it fails (for the error messages).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout: float
    #: Whether the ranks have exchanged their settings (set-up is over).
    agreed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes checkpoints and the metrics log, and shows progress."""
        return self.rank == 0

    # -- the share of a meta-batch ---------------------------------------------------------------

    def share(self, num_tasks: int) -> slice:
        """This rank's contiguous share of a batch of ``num_tasks`` tasks: ``num_tasks //
        world_size`` tasks, and one more on the first ``num_tasks % world_size`` ranks."""
        if num_tasks < self.world_size:
            raise DistributedTrainingError(
                f"a meta-batch of {num_tasks} tasks cannot be shared by {self.world_size} ranks: "
                f"every rank needs at least one task (raise meta_batch_size to "
                f">= {self.world_size}, or launch fewer ranks)"
            )
        base, extra = divmod(num_tasks, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + int(self.rank < extra))

    def local_batch(self, batch: TaskBatch) -> tuple[TaskBatch, float]:
        """This rank's share of ``batch`` and its weight :math:`T_r/T` in the mean over tasks."""
        part = self.share(batch.num_tasks)
        return batch.select(part), (part.stop - part.start) / batch.num_tasks

    # -- set-up ------------------------------------------------------------------------------------

    def start(self, result: FitResult, control: StepControl, parameters: Sequence[Tensor]) -> None:
        """Check that every rank runs the same settings on the same parameter shapes (else a
        :class:`DistributedTrainingError` naming the field, on every rank), then copy rank 0's
        parameters and buffers to every rank."""
        fields = _fingerprint(result, control, parameters)
        gathered = self._exchange({"fields": fields, "failure": None})
        reference = gathered[0]["fields"]
        for rank, payload in enumerate(gathered):
            mine = payload["fields"]
            for key in sorted(set(reference) | set(mine), key=str):
                if reference.get(key) != mine.get(key):
                    raise DistributedTrainingError(
                        f"the ranks disagree on {key}: rank 0 has {reference.get(key)!r}, rank "
                        f"{rank} has {mine.get(key)!r}. Every rank of a distributed fit must run "
                        "the same settings on the same model (to train independent runs on "
                        "each rank, pass distributed=False)"
                    )
        batch = int(result.config["meta_batch_size"])
        available = result.config.get("num_tasks")
        usable = batch if available is None else min(batch, int(available))
        if usable < self.world_size:
            raise DistributedTrainingError(
                f"meta_batch_size={batch}"
                + (f" (with {available} tasks available)" if usable < batch else "")
                + f" cannot be shared by {self.world_size} ranks: every rank needs at least one "
                "task of each meta-batch"
            )
        self._broadcast_state(result, parameters)
        logger.info(
            "data-parallel meta-training on %d ranks (%s); rank %d takes %d of %d tasks a step",
            self.world_size,
            self.backend,
            self.rank,
            self.share(usable).stop - self.share(usable).start,
            usable,
        )

    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks, waiting in :meth:`start`, that this one failed during set-up
        (so they stop with an error naming it instead of waiting for the timeout)."""
        if self.agreed:
            return
        self._exchange({"fields": None, "failure": f"{type(error).__name__}: {error}"})

    def _exchange(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        gathered: list[Any] = [None] * self.world_size
        self._collective(
            "exchanging the run's settings", lambda: dist.all_gather_object(gathered, payload)
        )
        self.agreed = True
        failed = [
            (rank, p["failure"]) for rank, p in enumerate(gathered) if p["failure"] is not None
        ]
        if failed and payload["failure"] is None:
            rank, message = failed[0]
            raise DistributedTrainingError(
                f"rank {rank} of {self.world_size} failed while setting up meta-training, so "
                f"rank {self.rank} stops too: {message}"
            )
        return gathered

    def _broadcast_state(self, result: FitResult, parameters: Sequence[Tensor]) -> None:
        tensors = {id(t): t for t in parameters}
        for owner in (result.model, result.guide):
            if isinstance(owner, torch.nn.Module):
                for t in owner.buffers():
                    tensors.setdefault(id(t), t)
        with torch.no_grad():
            for t in tensors.values():
                self._collective("copying rank 0's parameters", partial(dist.broadcast, t, src=0))

    # -- a meta-step -------------------------------------------------------------------------------

    def reduce_step(self, value: float, parameters: Sequence[Tensor], weight: float) -> float:
        r"""Sum ``weight * value`` and ``weight * grad`` of every parameter over the ranks.

        ``value`` is this rank's objective on its share (NaN when it failed, so that every rank
        sees a non-finite total); ``weight`` is :math:`T_r/T`. Afterwards every parameter's
        ``.grad`` holds the global meta-gradient, on every rank (a parameter no rank gave a
        gradient keeps ``None``, as in a single process). Returns the global objective.
        """
        head = torch.tensor(
            [weight * value] + [float(p.grad is not None) for p in parameters],
            dtype=torch.float64,
            device=self.device,
        )
        self._collective("summing the meta-loss", lambda: dist.all_reduce(head))
        present = [bool(flag > 0) for flag in head[1:].tolist()]
        groups: dict[torch.dtype, list[Tensor]] = {}
        for p, has in zip(parameters, present, strict=True):
            if not has:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault(p.grad.dtype, []).append(p)
        for group in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group if p.grad is not None])
            flat.mul_(weight)
            self._collective("summing the meta-gradient", partial(dist.all_reduce, flat))
            for p, part in zip(group, flat.split([p.numel() for p in group]), strict=True):
                if p.grad is not None:
                    p.grad.copy_(part.view_as(p.grad))
        return float(head[0])

    def agree(self, check: Callable[[], None]) -> None:
        """Run ``check`` on this rank; if it raised :class:`NumericalError` on any rank, raise
        it on every rank (the message of the lowest such rank)."""
        message: str | None = None
        try:
            check()
        except NumericalError as err:
            message = str(err)
        gathered: list[Any] = [None] * self.world_size
        self._collective("agreeing on a guard", lambda: dist.all_gather_object(gathered, message))
        failed = [(rank, m) for rank, m in enumerate(gathered) if m is not None]
        if failed:
            rank, first = failed[0]
            raise NumericalError(first if rank == self.rank else f"{first} (on rank {rank})")

    def synchronize(self) -> None:
        """Wait until every rank is here (e.g. rank 0 has written the final checkpoint)."""
        token = torch.zeros(1, device=self.device)
        self._collective("waiting for the other ranks", lambda: dist.all_reduce(token))

    def _collective(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedTrainingError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({first}). Another rank "
                f"has stopped (it raised, died or was killed: see its output) or has not "
                f"answered within the {self.timeout:g} s timeout for collective operations "
                f"(set {TIMEOUT_VARIABLE} to change it)"
            ) from err


def _plain(value: Any) -> Any:
    """A setting as every rank can compare it: plain values as they are, anything else (a
    callable, an object) by its type's name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    kind = value if isinstance(value, type) else type(value)
    return f"<{kind.__module__}.{kind.__qualname__}>"


def _fingerprint(
    result: FitResult, control: StepControl, parameters: Sequence[Tensor]
) -> dict[str, Any]:
    """What every rank must agree on: the run's settings (the device aside: each rank has its
    own), the step it starts from, the optimiser, the loop's own options that decide when
    collectives run, and the trained parameters' shapes and types."""
    fields: dict[str, Any] = {k: _plain(v) for k, v in result.config.items() if k != "device"}
    state = result.training
    fields.update(
        objective=_plain(result.objective),
        start_step=len(result.history),
        optimizer=_plain(None if state is None else state.optimizer),
        lr_scheduler=_plain(None if state is None else state.scheduler),
        clip_grad_norm=control.clip_grad_norm,
        check_every=control.check_every,
        parameter_shapes=[list(p.shape) for p in parameters],
        parameter_dtypes=[str(p.dtype) for p in parameters],
        torch=torch.__version__,
    )
    return fields
