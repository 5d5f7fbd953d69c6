"""Horovod/MPI runtime: init, rank and size, rank-0 printing, device choice."""

from hvdllm.comm.runtime import (
    barrier,
    choose_device,
    horovod,
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

__all__ = [
    "barrier", "choose_device", "horovod", "init", "is_initialized", "local_rank",
    "local_size", "print0", "rank", "set_threads", "size", "threads_per_rank",
]
