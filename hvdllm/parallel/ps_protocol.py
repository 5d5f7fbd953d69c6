"""The parameter server's wire protocol, shared by its workers (param_server.py) and its
servers (server_loop.py): message kinds and tags, the reply header, how parameters are cut
into server shards, and the workers' heartbeats.

Every message travels on a duplicate of COMM_WORLD as raw bytes (gradients and parameters as
flat buffers, never pickled; only the workers' small gathered objects are); its tag is
``clock * KINDS + kind``, where the clock is the sender's step count (a gather's round).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch

from hvdllm.errors import UserError

# Message kinds, the low bits of a tag. PUSH: a gradient (or, with none, the first pull).
# DONE: a worker's last message. CHECKPOINT: worker 0 asks for the servers' shards.
# GATHER: a worker's part of one of the workers' collectives, gathered by server 0.
# HEARTBEAT: a worker is alive (sent by a thread, whatever the training loop is doing).
# EVALUATE: a worker asks for the weights to evaluate at a step (one snapshot per step).
# END: leave (read by the worker's heartbeat thread, which exits the process): a server ends
# the job (under mpirun --enable-recovery MPI_Abort ends only the caller), or went on
# without this worker (declared dead while it was stopped or slow).
PUSH, DONE, CHECKPOINT, GATHER, HEARTBEAT, EVALUATE, END = range(7)
KINDS = 8
SERVER_SHARD = 1000  # server k's checkpoint file is shard SERVER_SHARD + k (step-N.stage-100k.pt)
# A push's statistics (float64, at its front): the sum of its micro-batches' losses (times its
# weight in the clock's mean), the non-finite and stop flags, the samples it computed, and the
# seconds its forward and backward took (what parallel.load_balance splits by).
S_LOSS, S_NONFINITE, S_STOP, S_SAMPLES, S_SECONDS = range(5)
STATS = 5
# The payload of a message that is its tag alone (HEARTBEAT, DONE, END, CHECKPOINT): zero bytes.
EMPTY = torch.empty(0, dtype=torch.uint8).numpy()
# The reply header (float64): complete clocks when sent, updates, applied and dropped pushes,
# clock at which every worker stops (-1: none), the clock's summed statistics and push count,
# the global gradient norm of the update (s = 0), the workers declared dead, the samples of
# the next clock's global batch this worker computes (start, count; parallel.load_balance),
# then the staleness histogram (s + 1 bins).
(H_VERSION, H_UPDATES, H_APPLIED, H_DROPPED, H_STOP_AT, H_LOSS, H_NONFINITE, H_STOP, H_COUNT, H_NORM,
 H_DEAD, H_SPAN_START, H_SPAN_COUNT, H_HIST) = range(14)


def header_size(max_staleness: int) -> int:
    return H_HIST + max_staleness + 1


def tag(clock: int, kind: int) -> int:
    return clock * KINDS + kind


def shard_ranges(numels: list[int], servers: int) -> list[tuple[int, int]]:
    """Parameter index ranges ``[start, end)``, one per server, contiguous, non-empty and of
    about equal size: cut ``k`` goes where the running total first reaches ``k / servers`` of
    all elements, but leaves at least one tensor to each range. Raises UserError when there
    are more servers than tensors (workers and servers raise it alike, before any message)."""
    if servers > len(numels):
        raise UserError(f"parallel.servers={servers} is more than the model's {len(numels)} parameter tensors: "
                        f"use fewer servers")
    total, bounds = sum(numels), [0]
    running = [sum(numels[:i + 1]) for i in range(len(numels))]
    for k in range(1, servers):
        cut = next((i + 1 for i, value in enumerate(running) if value >= total * k / servers), len(numels))
        bounds.append(min(max(cut, bounds[-1] + 1), len(numels) - (servers - k)))
    bounds.append(len(numels))
    return list(zip(bounds[:-1], bounds[1:]))


def launcher_keeps_survivors(environ: dict[str, str] | None = None) -> bool:
    """Whether the launcher lets the other ranks run on when one dies. Open MPI's mpirun kills
    the job unless started with ``--enable-recovery``, which it passes to the ranks as
    ``OMPI_MCA_orte_enable_recovery``; other launchers cannot be asked (srun needs ``--no-kill``)."""
    env = os.environ if environ is None else environ
    if "OMPI_COMM_WORLD_SIZE" not in env:
        return True
    return env.get("OMPI_MCA_orte_enable_recovery", "0").lower() in ("1", "true", "yes")


class Heartbeat:
    """A worker's thread that sends an empty HEARTBEAT to every server each ``interval_s``, so
    that the servers tell a dead or stopped worker (silent) from a busy one (writing a large
    checkpoint, evaluating): only the whole process stopping silences it. It also ends the
    process when a server says END."""

    def __init__(self, p2p, servers: list[int], interval_s: float) -> None:
        self.p2p, self.servers, self.interval_s = p2p, servers, interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hvdllm-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from mpi4py import MPI

        while not self._stopped.wait(self.interval_s):
            MPI.Request.Waitall([self.p2p.Isend([EMPTY, MPI.BYTE], dest=server, tag=tag(0, HEARTBEAT))
                                 for server in self.servers])
            if self.p2p.Iprobe(source=MPI.ANY_SOURCE, tag=tag(0, END)):
                print(f"error: rank {self.p2p.Get_rank()}: a parameter server ended the job or went on without "
                      f"this worker (its line says why)", file=sys.stderr, flush=True)
                os._exit(1)

    def stop(self) -> None:
        """Before the worker's DONE: no heartbeat may follow it."""
        self._stopped.set()
        self._thread.join()


def silent_workers(last_heard: dict[int, float], timeout_s: float, now: float | None = None) -> list[int]:
    """The workers not heard from (any message) for longer than ``timeout_s``."""
    now = time.monotonic() if now is None else now
    return sorted(w for w, heard in last_heard.items() if now - heard > timeout_s)
