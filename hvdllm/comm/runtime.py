"""A thin layer over ``horovod.torch``: the one place that initializes Horovod and holds it.

Training strategies start it through :func:`init` (``hvdllm.parallel``); code that needs the
module afterwards asks :func:`horovod` instead of importing and initializing its own.

Works the same under ``mpirun``, ``horovodrun`` (MPI or ``--gloo``), SLURM ``srun`` and plain
``python`` (a single rank). Horovod is imported lazily so that code paths which need no
communication (``hvdllm plan``, single-rank tests) do not pay for it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from hvdllm.errors import UserError

_state: dict[str, Any] = {"hvd": None}


def horovod():
    """The initialized ``horovod.torch`` module."""
    if _state["hvd"] is None:
        raise RuntimeError("hvdllm.comm.init() must be called before using the runtime")
    return _state["hvd"]


def init(comm: Any = None, process_sets: Sequence[Sequence[int]] | None = None,
         threads: int = 0) -> list:
    """Initialize Horovod (idempotent) and this rank's torch threads.

    Args:
        comm: an mpi4py communicator (or a list of ranks) to run Horovod on a subset of
            MPI_COMM_WORLD; None uses the whole world.
        process_sets: extra groups of ranks to register as Horovod process sets.
        threads: torch intra-op threads; 0 = the node's cores divided by its local ranks.

    Returns:
        The registered ``hvd.ProcessSet`` objects, in the order of ``process_sets``.
    """
    if _state["hvd"] is not None:
        if process_sets:  # they can only be declared at hvd.init (without dynamic process sets)
            raise RuntimeError("Horovod is already initialized: process sets must be given to the first init()")
        return []
    import horovod.torch as hvd

    kwargs: dict[str, Any] = {}
    if comm is not None:
        kwargs["comm"] = comm
    sets = [hvd.ProcessSet(list(ranks)) for ranks in process_sets or ()]
    if sets:
        kwargs["process_sets"] = sets
    hvd.init(**kwargs)
    _state["hvd"] = hvd
    set_threads(threads, hvd.local_size())
    return sets


def set_threads(threads: int, ranks_on_node: int) -> None:
    """torch intra-op threads for this rank: ``threads``, or when 0 the node's cores divided
    by its ranks."""
    torch.set_num_threads(threads or threads_per_rank(ranks_on_node))


def is_initialized() -> bool:
    return _state["hvd"] is not None and _state["hvd"].is_initialized()


def rank() -> int:
    return horovod().rank()


def size() -> int:
    return horovod().size()


def local_rank() -> int:
    return horovod().local_rank()


def local_size() -> int:
    return horovod().local_size()


def barrier() -> None:
    horovod().barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (or always, before init)."""
    if _state["hvd"] is None or rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def threads_per_rank(ranks_on_node: int, cores: int | None = None) -> int:
    """Cores this rank may use so that the node's ranks do not oversubscribe it."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, ranks_on_node))


def choose_device(preference: str = "auto", local_rank_: int | None = None) -> torch.device:
    """The device a rank computes on: ``auto`` is ``cuda:local_rank`` when CUDA is there, else
    the CPU; ``cuda`` is the same but requires CUDA; a name such as ``cuda:1`` or ``cpu`` is
    taken as it is. Raises UserError, naming the device, for one that is not there."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise UserError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"device {preference!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise UserError(f"device {preference!r}: torch sees no CUDA device (torch {torch.__version__})")
    count = torch.cuda.device_count()
    if device.index is None:
        if local_rank_ is None:
            local_rank_ = local_rank() if _state["hvd"] is not None else 0
        device = torch.device("cuda", local_rank_ % count)
    elif device.index >= count:
        raise UserError(f"device {preference!r}: this node has {count} CUDA device(s)")
    torch.cuda.set_device(device)
    return device
