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

import atexit
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from hierbayes.errors import HierbayesError, NumericalError
from hierbayes.tasks.batch import TaskBatch

if TYPE_CHECKING:
    from hierbayes.inference.training.loop import TrainingControl
    from hierbayes.inference.training.result import FitResult

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_VARIABLE",
    "DistributedContext",
    "DistributedTrainingError",
    "collective_timeout",
    "distributed_session",
    "is_main_process",
    "launch_rank",
    "launch_world_size",
]

logger = logging.getLogger("hierbayes.fit")

#: Seconds a collective operation (and joining the process group) may wait for the other ranks.
DEFAULT_TIMEOUT = 600.0
#: The environment variable that overrides :data:`DEFAULT_TIMEOUT` (seconds).
TIMEOUT_VARIABLE = "HIERBAYES_DIST_TIMEOUT"
#: The variables ``torchrun`` sets that ``env://`` initialisation reads.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


class DistributedTrainingError(HierbayesError, RuntimeError):
    """A multi-process run that cannot go on: the ranks disagree on the settings, a rank failed
    or died, a collective operation timed out, or the launch is misconfigured."""


def launch_world_size() -> int:
    """The number of ranks of this launch: the process group's size when one is initialised,
    else ``WORLD_SIZE`` as ``torchrun`` sets it (``1`` for a plain ``python`` run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _int_variable("WORLD_SIZE", 1)


def launch_rank() -> int:
    """This process's rank: the process group's when one is initialised, else ``RANK`` as
    ``torchrun`` sets it (``0`` for a plain ``python`` run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _int_variable("RANK", 0)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes outputs."""
    return launch_rank() == 0


def collective_timeout() -> timedelta:
    """How long a collective operation waits: ``HIERBAYES_DIST_TIMEOUT`` seconds when set,
    else :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None or not text.strip():
        return timedelta(seconds=DEFAULT_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds; got {text!r}")
    return timedelta(seconds=seconds)


def _int_variable(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedTrainingError(
            f"the environment variable {name}={text!r} is not an integer (torchrun sets it)"
        ) from None


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

    def start(
        self, result: FitResult, control: TrainingControl, parameters: Sequence[Tensor]
    ) -> None:
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
    result: FitResult, control: TrainingControl, parameters: Sequence[Tensor]
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


# -- joining a launch ------------------------------------------------------------------------------


def join_launch(distributed: bool | None, device: str | torch.device) -> DistributedContext | None:
    """This process's :class:`DistributedContext`, or ``None`` to train on its own.

    ``distributed=None`` (automatic) trains data-parallel when there is more than one rank:
    a process group of several ranks is initialised, or ``torchrun`` set ``WORLD_SIZE > 1``.
    ``True`` does the same and says so in the log when there is one rank; ``False`` never does.
    """
    if distributed is False:
        return None
    world = launch_world_size()
    if world <= 1:
        if distributed:
            logger.info("distributed=True but this is the only rank: training on one process")
        return None
    if not dist.is_available():
        raise DistributedTrainingError(
            f"WORLD_SIZE={world} asks for {world} ranks, but this torch build has no "
            "torch.distributed"
        )
    requested = torch.device(device)
    timeout = collective_timeout()
    if not dist.is_initialized():
        _initialise(requested, world, timeout)
    backend = str(dist.get_backend())
    local_rank = _int_variable("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count()))
    dev = requested
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedTrainingError(
                "device='cuda' was requested but torch.cuda.is_available() is False"
            )
        dev = torch.device("cuda", local_rank if requested.index is None else requested.index)
        torch.cuda.set_device(dev)
    elif "nccl" in backend:
        raise DistributedTrainingError(
            f"the process group uses the {backend} backend, which needs CUDA tensors, but "
            f"device={str(requested)!r}: train on device='cuda', or initialise the process "
            "group with backend='gloo' to train on CPUs"
        )
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=backend,
        timeout=timeout.total_seconds(),
    )


def _initialise(requested: torch.device, world: int, timeout: timedelta) -> None:
    """``init_process_group`` from ``torchrun``'s environment: NCCL for CUDA, gloo otherwise."""
    missing = [name for name in _LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise DistributedTrainingError(
            f"WORLD_SIZE={world} asks for {world} ranks, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun "
            "(torchrun --nproc_per_node=K script.py), or initialise the process group yourself "
            "(torch.distributed.init_process_group) before calling fit"
        )
    options: dict[str, Any] = {}
    if requested.type == "cuda":
        local = _int_variable("LOCAL_RANK", 0)
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise DistributedTrainingError(
                f"rank {os.environ['RANK']} asks for GPU cuda:{local} (LOCAL_RANK), but this "
                f"machine has {torch.cuda.device_count()} visible CUDA device(s): launch at most "
                "that many ranks per node (torchrun --nproc_per_node)"
            )
        backend = "nccl"
        options["device_id"] = torch.device("cuda", local)
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout, **options)
    except (RuntimeError, ValueError) as err:
        raise DistributedTrainingError(
            f"rank {os.environ['RANK']} could not join the {world} ranks at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} with {backend} within "
            f"{timeout.total_seconds():g} s ({str(err).strip().splitlines()[0]}): were all "
            f"{world} ranks started, with the same MASTER_ADDR and MASTER_PORT?"
        ) from err
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(
    distributed: bool | None, device: str | torch.device
) -> Iterator[DistributedContext | None]:
    """:func:`join_launch` for one ``fit`` call; an exception raised on this rank before the
    ranks have exchanged their settings is reported to the others, which stop too."""
    context = join_launch(distributed, device)
    try:
        yield context
    except BaseException as err:
        if context is not None and not context.agreed:
            context.report_failure(err)
        raise
