"""Horovod/MPI runtime: init, rank and size, rank-0 printing, process sets, device choice."""

from hvdllm.comm.runtime import (
    barrier,
    choose_device,
    init,
    is_initialized,
    local_rank,
    local_size,
    print0,
    rank,
    set_threads,
    size,
    threads_per_rank,
)
from hvdllm.comm.process_sets import contiguous_groups

__all__ = [
    "barrier", "choose_device", "contiguous_groups", "init", "is_initialized", "local_rank",
    "local_size", "print0", "rank", "set_threads", "size", "threads_per_rank",
]
