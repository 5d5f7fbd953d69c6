"""A thin layer over ``horovod.torch``: the one place that initializes Horovod and holds it.

Training strategies start it through :func:`init` (``hvdllm.parallel``); code that needs the
module afterwards asks :func:`horovod` instead of importing and initializing its own.

Works the same under ``mpirun``, ``horovodrun`` (MPI or ``--gloo``), SLURM ``srun`` and plain
``python`` (a single rank). Horovod is imported lazily so that code paths which need no
communication (``hvdllm plan``, single-rank tests) do not pay for it.
"""

from __future__ import annotations

import os
from typing import Any, Hashable, Sequence

import torch

from hvdllm.comm.groups import Group, Groups, my_groups, process_sets_to_declare
from hvdllm.comm.launch import launched_world_size
from hvdllm.errors import UserError

_state: dict[str, Any] = {"hvd": None, "sets": {}}  # the module, and its process sets by ranks


def horovod():
    """The initialized ``horovod.torch`` module."""
    if _state["hvd"] is None:
        raise RuntimeError("hvdllm.comm.init() must be called before using the runtime")
    return _state["hvd"]


def init(named_groups: dict[Hashable, Sequence[Sequence[int]]] | None = None, threads: int = 0,
         mpi: bool = False) -> Groups:
    """Initialize Horovod (once) with a process set for every group a job will use, and this
    rank's torch threads.

    Args:
        named_groups: for each set of grid axes (any hashable key), all its groups of global
            ranks; every rank passes the same mapping.
        threads: torch intra-op threads; 0 = the node's cores divided by its local ranks.
        mpi: also give each group an mpi4py communicator (point to point, small collectives).
            MPI is then started by mpi4py first, with MPI_THREAD_MULTIPLE, and Horovod runs on
            its COMM_WORLD, which must be the whole job (mpirun, srun, horovodrun --mpi).

    Returns:
        This rank's group for each key of ``named_groups``.
    """
    named_groups = named_groups or {}
    world = None
    if mpi:
        from mpi4py import MPI  # before hvd.init, so that MPI runs with THREAD_MULTIPLE

        world = MPI.COMM_WORLD
        if world.Get_size() != launched_world_size():
            raise UserError("this layout sends tensors point to point over MPI: launch with mpirun, srun or "
                            "horovodrun --mpi (not --gloo)")
    declared = process_sets_to_declare(_launched_size(world), named_groups)
    if _state["hvd"] is None:
        _start_horovod(declared, world, threads)
    elif any(tuple(ranks) not in _state["sets"] for ranks in declared):
        raise RuntimeError("Horovod is already initialized: process sets must be given to the first init()")
    hvd, by_ranks = _state["hvd"], _state["sets"]
    groups = {}
    for axes, ranks in my_groups(hvd.rank(), named_groups).items():
        if len(ranks) == hvd.size():
            process_set = hvd.global_process_set
        else:
            process_set = by_ranks.get(tuple(sorted(ranks)))
        # Split is collective over the world: every rank splits for every key, in the same order.
        split = world.Split(color=min(ranks), key=hvd.rank()) if world is not None else None
        groups[axes] = Group(tuple(ranks), ranks.index(hvd.rank()), process_set, split)
    return Groups(groups)


def _start_horovod(declared: list[list[int]], world, threads: int) -> None:
    import horovod.torch as hvd

    sets = [hvd.ProcessSet(ranks) for ranks in declared]
    kwargs: dict[str, Any] = {"process_sets": sets} if sets else {}
    if world is not None:
        kwargs["comm"] = world
    hvd.init(**kwargs)
    _state["hvd"] = hvd
    _state["sets"] = {tuple(ranks): process_set for ranks, process_set in zip(declared, sets)}
    set_threads(threads, hvd.local_size())


def _launched_size(world) -> int:
    """The job's size before Horovod starts: MPI's world, else what the launcher says."""
    return world.Get_size() if world is not None else launched_world_size()


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
