r"""Joining a ``torchrun`` launch: the ranks, the process group, the collective timeout.

:func:`distributed_session` (what ``fit`` enters) joins the launch a process belongs to and
returns its :class:`~hierbayes.inference.training.distributed.DistributedContext` (or ``None``
to train on its own); see :mod:`hierbayes.inference.training.distributed` for what the ranks
then do together.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hierbayes.inference.training.distributed import (
    DEFAULT_TIMEOUT,
    TIMEOUT_VARIABLE,
    DistributedContext,
    DistributedTrainingError,
)

__all__ = [
    "collective_timeout",
    "distributed_session",
    "is_main_process",
    "join_launch",
    "launch_rank",
    "launch_world_size",
]

logger = logging.getLogger("hierbayes.fit")

#: The variables ``torchrun`` sets that ``env://`` initialisation reads.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
