"""The parameter server's communicators and a worker's side of the wire (the server's is
server_loop.py), over hvdllm.comm's tagged byte messages (ps_protocol.py says what they hold).
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from hvdllm.comm.messages import Messages, tag_upper_bound, threads_may_send, wait_all, world_place
from hvdllm.errors import UserError
from hvdllm.parallel.ps_protocol import Kind, check_tag_bound


@dataclass
class Comms:
    rank: int
    local_rank: int  # this rank on its node
    ranks_on_node: int
    p2p: Messages  # the protocol's messages, apart from anything else on COMM_WORLD
    servers_comm: Messages  # the servers alone (they sum their shards' gradient norms on it); workers alone


def open_comms(world_size: int, workers: int) -> Comms:
    """Check the MPI library and the launch, then make the protocol's communicators (a
    collective of every rank, servers and workers)."""
    if not threads_may_send():  # the heartbeat thread sends beside the main one
        raise UserError("parallel.strategy=async needs an MPI library with MPI_THREAD_MULTIPLE")
    place = world_place()
    if place.size != world_size:
        raise UserError("parallel.strategy=async pushes over MPI: launch with mpirun, srun or horovodrun --mpi "
                        "(not --gloo)")
    check_tag_bound(tag_upper_bound())
    return Comms(place.rank, place.local_rank, place.ranks_on_node, Messages.duplicate_world(),
                 Messages.split_world(color=int(place.rank >= workers)))


class WorkerLink:
    """A worker's requests to the servers (``servers``: their ranks, server k at index k)."""

    REPLY = {Kind.PULL: Kind.PARAMS, Kind.PUSH: Kind.PARAMS, Kind.EVALUATE: Kind.EVALUATE,
             Kind.CHECKPOINT: Kind.CHECKPOINT}

    def __init__(self, p2p: Messages, servers: list[int]) -> None:
        self.p2p, self.servers = p2p, servers

    def exchange(self, kind: Kind, messages: list[np.ndarray], replies: list[np.ndarray]) -> None:
        """Send ``messages[k]`` to server k and wait for its reply in ``replies[k]``."""
        requests = []
        for server, message, reply in zip(self.servers, messages, replies):
            requests.append(self.p2p.irecv(reply, source=server, tag=int(self.REPLY[kind])))
            requests.append(self.p2p.isend(message, dest=server, tag=int(kind)))
        wait_all(requests)

    def tell(self, kind: Kind, message: np.ndarray) -> None:
        """Send the same message to every server; no reply."""
        wait_all([self.p2p.isend(message, dest=server, tag=int(kind)) for server in self.servers])

    def gather(self, message: np.ndarray) -> bytes:
        """Send a GATHER to server 0 and return its reply, of a size known when it comes."""
        server = self.servers[0]
        send = self.p2p.isend(message, dest=server, tag=int(Kind.GATHER))
        reply = self.p2p.recv_sized(source=server, tag=int(Kind.GATHER))
        send.Wait()
        return reply


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
            if p2p.waiting(int(Kind.END)):
                print(f"error: rank {p2p.rank}: a parameter server ended the job or went on without "
                      f"this worker (its line says why)", file=sys.stderr, flush=True)
                os._exit(1)

    def stop(self) -> None:
        """Before the worker's DONE: no heartbeat may follow it."""
        self._stopped.set()
        self._thread.join()
