"""The parameter server's communicators and a worker's side of the wire: the only place in a
worker that speaks MPI (the server's is server_loop.py). Messages are raw bytes of
contiguous buffers (ps_protocol.py), never pickled here.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hvdllm.errors import UserError
from hvdllm.parallel.ps_protocol import Kind, check_tag_bound


@dataclass
class Comms:
    rank: int
    local_rank: int  # this rank on its node
    ranks_on_node: int
    p2p: object  # the protocol's messages, apart from anything else on COMM_WORLD
    servers_comm: object  # the servers alone (they sum their shards' gradient norms on it); workers alone


def open_comms(world_size: int, workers: int) -> Comms:
    """Check the MPI library and the launch, then make the protocol's communicators (a
    collective of every rank, servers and workers)."""
    world = MPI.COMM_WORLD
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:  # the heartbeat thread sends beside the main one
        raise UserError("parallel.strategy=async needs an MPI library with MPI_THREAD_MULTIPLE")
    if world.Get_size() != world_size:
        raise UserError("parallel.strategy=async pushes over MPI: launch with mpirun, srun or horovodrun --mpi "
                        "(not --gloo)")
    check_tag_bound(world.Get_attr(MPI.TAG_UB))
    rank = world.Get_rank()
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, ranks_on_node = node.Get_rank(), node.Get_size()
    node.Free()
    return Comms(rank, local_rank, ranks_on_node, world.Dup(), world.Split(color=int(rank >= workers), key=rank))


class WorkerLink:
    """A worker's requests to the servers (``servers``: their ranks, server k at index k)."""

    REPLY = {Kind.PULL: Kind.PARAMS, Kind.PUSH: Kind.PARAMS, Kind.EVALUATE: Kind.EVALUATE,
             Kind.CHECKPOINT: Kind.CHECKPOINT}

    def __init__(self, p2p, servers: list[int]) -> None:
        self.p2p, self.servers = p2p, servers

    def exchange(self, kind: Kind, messages: list[np.ndarray], replies: list[np.ndarray]) -> None:
        """Send ``messages[k]`` to server k and wait for its reply in ``replies[k]``."""
        requests = []
        for server, message, reply in zip(self.servers, messages, replies):
            requests.append(self.p2p.Irecv([reply, MPI.BYTE], source=server, tag=int(self.REPLY[kind])))
            requests.append(self.p2p.Isend([message, MPI.BYTE], dest=server, tag=int(kind)))
        MPI.Request.Waitall(requests)

    def tell(self, kind: Kind, message: np.ndarray) -> None:
        """Send the same message to every server; no reply."""
        MPI.Request.Waitall([self.p2p.Isend([message, MPI.BYTE], dest=server, tag=int(kind))
                             for server in self.servers])

    def gather(self, message: np.ndarray) -> bytes:
        """Send a GATHER to server 0 and return its reply, of a size known when it comes."""
        server, status = self.servers[0], MPI.Status()
        send = self.p2p.Isend([message, MPI.BYTE], dest=server, tag=int(Kind.GATHER))
        self.p2p.Probe(source=server, tag=int(Kind.GATHER), status=status)
        reply = bytearray(status.Get_count(MPI.BYTE))
        self.p2p.Recv([reply, MPI.BYTE], source=server, tag=int(Kind.GATHER))
        send.Wait()
        return bytes(reply)


class Heartbeat:
    """A worker's thread that sends an empty HEARTBEAT to every server each ``interval_s``, so
    that the servers tell a dead or stopped worker (silent) from a busy one (writing a large
    checkpoint, evaluating): only the whole process stopping silences it. It also ends the
    process when a server says END."""

    def __init__(self, link: WorkerLink, interval_s: float) -> None:
        self.link, self.interval_s = link, interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hvdllm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        empty = np.empty(0, dtype=np.uint8)
        p2p = self.link.p2p
        while not self._stopped.wait(self.interval_s):
            self.link.tell(Kind.HEARTBEAT, empty)
            if p2p.Iprobe(source=MPI.ANY_SOURCE, tag=int(Kind.END)):
                print(f"error: rank {p2p.Get_rank()}: a parameter server ended the job or went on without "
                      f"this worker (its line says why)", file=sys.stderr, flush=True)
                os._exit(1)

    def stop(self) -> None:
        """Before the worker's DONE: no heartbeat may follow it."""
        self._stopped.set()
        self._thread.join()
