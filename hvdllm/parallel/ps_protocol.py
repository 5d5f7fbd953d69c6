"""The parameter server's wire protocol, shared by its workers (param_server.py) and its
servers (server_loop.py): message kinds, typed headers, how parameters are cut into server
shards. No MPI here: docs/design/parameter-server.md describes the exchange.

A message is ``[header | body]`` as raw bytes on a duplicate of COMM_WORLD: the header a numpy
structured record (named fields), the body a flat float32 buffer (a gradient or a parameter
shard) or, for the workers' gathered objects only, pickled bytes. Its MPI tag is its kind:
the clock travels in the header, so tags stay small whatever the run's length.
"""

from __future__ import annotations

import os
import time
from enum import IntEnum

import numpy as np
import torch

from hvdllm.errors import UserError


class Kind(IntEnum):
    """A message's kind, which is its MPI tag. Replies go the other way under the kind they
    answer (a rank is either a worker or a server, so the two directions never match)."""

    PULL = 1  # worker: the parameters to start from (a PUSH_HEADER, no gradient); answered by PARAMS
    PUSH = 2  # worker: a clock's gradient (PUSH_HEADER, float32 shard); answered by PARAMS
    PARAMS = 3  # server: the parameters for the worker's next clock (REPLY header, float32 shard)
    DONE = 4  # worker: its last message (STEP_HEADER: its clock)
    HEARTBEAT = 5  # worker: alive (no bytes), sent by a thread whatever the training loop is doing
    CHECKPOINT = 6  # worker 0: write your shard of a step (STEP_HEADER); answered, once written, with no bytes
    EVALUATE = 7  # worker: the weights to evaluate at a step (STEP_HEADER); answered by a snapshot (REPLY, shard)
    GATHER = 8  # worker: its part of one of the workers' collectives (STEP_HEADER: the round, pickled bytes);
    #             server 0 answers with every live worker's part (pickled)
    END = 9  # server: leave (no bytes): the job ends, or went on without this worker


MAX_TAG = max(Kind)
SERVER_SHARD = 1000  # server k's checkpoint file is shard SERVER_SHARD + k (step-N.stage-100k.pt)

# A PULL's or PUSH's header: the clock it is for, then the step statistics: the sum of its
# micro-batches' losses (times its weight in the clock's mean), the non-finite and stop flags,
# the samples it computed and the seconds its forward and backward took (load_balance.py).
PUSH_HEADER = np.dtype([("clock", "<i8"), ("loss", "<f8"), ("nonfinite", "<f8"), ("stop", "<f8"),
                        ("samples", "<f8"), ("seconds", "<f8")])
# DONE, CHECKPOINT, EVALUATE, GATHER: the step (a clock, or a gather's round) it is about.
STEP_HEADER = np.dtype([("step", "<i8")])
HEADERS = {Kind.PULL: PUSH_HEADER, Kind.PUSH: PUSH_HEADER, Kind.DONE: STEP_HEADER, Kind.CHECKPOINT: STEP_HEADER,
           Kind.EVALUATE: STEP_HEADER, Kind.GATHER: STEP_HEADER}  # what a worker's message starts with


def reply_header(max_staleness: int) -> np.dtype:
    """A PARAMS or EVALUATE reply's header: clocks complete when sent (version), the server's
    updates and applied and dropped pushes, the clock at which every worker stops (-1: none),
    the previous clock's summed statistics and pushes' weight, the global gradient norm of
    its update (s = 0), the workers declared dead, the span of the next global batch this
    worker computes (load_balance), and the staleness histogram (s + 1 bins)."""
    return np.dtype([("version", "<i8"), ("updates", "<i8"), ("applied", "<i8"), ("dropped", "<i8"),
                     ("stop_at", "<i8"), ("loss", "<f8"), ("nonfinite", "<f8"), ("stop", "<f8"), ("weight", "<f8"),
                     ("norm", "<f8"), ("dead", "<i8"), ("span_start", "<i8"), ("span_count", "<i8"),
                     ("hist", "<i8", (max_staleness + 1,))])


def header_view(buffer: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """The header at the front of a uint8 message buffer, as a writable record (``h["clock"]``)."""
    return buffer[:dtype.itemsize].numpy().view(dtype)[0]


def body_view(buffer: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """The float32 body after a header of ``dtype`` (a view: writing it writes the message)."""
    return buffer[dtype.itemsize:].view(torch.float32)


def encode(header: np.ndarray | None, body: torch.Tensor | bytes | None = None) -> np.ndarray:
    """One contiguous message: the header's bytes, then the body's (copied: the message
    outlives the tensors it was made of)."""
    parts = [] if header is None else [np.frombuffer(header.tobytes(), dtype=np.uint8)]
    if isinstance(body, torch.Tensor):
        parts.append(body.detach().contiguous().view(torch.uint8).numpy())
    elif body is not None:
        parts.append(np.frombuffer(body, dtype=np.uint8))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)


def check_tag_bound(tag_ub: int) -> None:
    """The MPI standard guarantees tags up to 32767 only; refuse a library that offers fewer
    than the protocol uses (checked at setup, on every rank, before any message)."""
    if tag_ub < MAX_TAG:
        raise UserError(f"parallel.strategy=async needs MPI tags up to {MAX_TAG}; this MPI's MPI_TAG_UB is {tag_ub}")


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


def silent_workers(last_heard: dict[int, float], timeout_s: float, now: float | None = None) -> list[int]:
    """The workers not heard from (any message) for longer than ``timeout_s``."""
    now = time.monotonic() if now is None else now
    return sorted(w for w, heard in last_heard.items() if now - heard > timeout_s)
