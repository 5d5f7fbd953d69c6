"""Tagged messages of raw bytes between ranks, over mpi4py: the parameter server's traffic.

Buffers are numpy arrays (views of torch storage): sent as bytes, never pickled. Sends and
receives are non-blocking and return mpi4py requests (``Test()``, ``Wait()``); :func:`wait_all`
completes a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI


@dataclass(frozen=True)
class WorldPlace:
    """Where this process is in MPI_COMM_WORLD and on its node."""

    rank: int
    size: int
    local_rank: int
    ranks_on_node: int


def world_place() -> WorldPlace:
    """Collective over the world (a split by node)."""
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    place = WorldPlace(world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size())
    node.Free()
    return place


def threads_may_send() -> bool:
    """Whether several threads of a process may call MPI at once (MPI_THREAD_MULTIPLE)."""
    return MPI.Query_thread() >= MPI.THREAD_MULTIPLE


def tag_upper_bound() -> int:
    """The largest tag this MPI library allows (the standard guarantees 32767)."""
    return MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)


def wait_all(requests: list) -> None:
    MPI.Request.Waitall(requests)


class Incoming:
    """A message matched by :meth:`Messages.poll`: its sender, tag and size, not yet received."""

    def __init__(self, message, status) -> None:
        self._message = message
        self.source, self.tag, self.size = status.Get_source(), status.Get_tag(), status.Get_count(MPI.BYTE)

    def receive_into(self, buffer: np.ndarray):
        """Start receiving it into ``buffer``; returns the request."""
        return self._message.Irecv([buffer, MPI.BYTE])


class Messages:
    """One communicator's tagged byte messages: its own traffic, apart from any other."""

    def __init__(self, comm) -> None:
        self.comm = comm

    @classmethod
    def duplicate_world(cls) -> "Messages":
        """Collective: a duplicate of MPI_COMM_WORLD."""
        return cls(MPI.COMM_WORLD.Dup())

    @classmethod
    def split_world(cls, color: int) -> "Messages":
        """Collective: the world's ranks of the same ``color``, in world order."""
        world = MPI.COMM_WORLD
        return cls(world.Split(color=color, key=world.Get_rank()))

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    def isend(self, data: np.ndarray, dest: int, tag: int):
        return self.comm.Isend([data, MPI.BYTE], dest=dest, tag=tag)

    def irecv(self, buffer: np.ndarray, source: int, tag: int):
        return self.comm.Irecv([buffer, MPI.BYTE], source=source, tag=tag)

    def recv_sized(self, source: int, tag: int) -> bytes:
        """Block for the next message from ``source`` with ``tag``, of a size known when it comes."""
        status = MPI.Status()
        self.comm.Probe(source=source, tag=tag, status=status)
        reply = bytearray(status.Get_count(MPI.BYTE))
        self.comm.Recv([reply, MPI.BYTE], source=source, tag=tag)
        return bytes(reply)

    def poll(self) -> Incoming | None:
        """The next message from anyone, matched (so no other receive can take it); None if none waits."""
        status = MPI.Status()
        message = self.comm.Improbe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
        return None if message is None else Incoming(message, status)

    def waiting(self, tag: int) -> bool:
        """Whether a message with ``tag`` from anyone is waiting."""
        return self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=tag)

    def sum(self, value: float) -> float:
        """Collective: ``value`` summed over the communicator."""
        return self.comm.allreduce(value, op=MPI.SUM)
