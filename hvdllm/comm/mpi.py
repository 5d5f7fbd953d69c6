"""mpi4py helpers: ending a whole job, and phases of jobs that move Python objects rather than
tensors (``hvdllm prepare``).

The rule they serve: a user error on one rank must end the job on every rank with one clear
line, never leave the others waiting in a collective. Each phase of work runs under
:func:`phase`; at its end all ranks learn whether any of them failed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from hvdllm.errors import UserError


def world():
    """MPI_COMM_WORLD (a single rank when not launched by mpirun / srun)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


class RankFailed(UserError):
    """Another rank hit a user error; this rank stops too."""


@contextmanager
def phase(comm) -> Iterator[None]:
    """Run a block of local work; afterwards every rank raises if any rank raised a UserError.

    The failing rank re-raises its own error; the others raise RankFailed naming it, so all
    exit together with one line each.
    """
    error: UserError | None = None
    try:
        yield
    except UserError as err:
        error = err
    errors = comm.allgather(None if error is None else str(error))
    if error is not None:
        raise error
    for rank, message in enumerate(errors):
        if message is not None:
            raise RankFailed(f"rank {rank} failed: {message}")


def abort_job(code: int = 1) -> None:
    """End every rank of the job: MPI_Abort when MPI is running (mpirun then kills all
    ranks, even a stopped one), else end this process (horovodrun --gloo ends its peers)."""
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # join an MPI already running (Horovod's), never start one
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(code)
    except ImportError:
        pass
    os._exit(code)
