"""A stall watchdog: ends the whole job when this rank has completed no step for too long.

A stopped rank's peers wait for it inside a collective for ever, and Horovod's own stall check
leaves it behind; so every rank runs this thread, which aborts the MPI job with one line
(docs/design/training-loop.md).
"""

from __future__ import annotations

import sys
import threading
import time

from hvdllm.comm.mpi import abort_job
from hvdllm.train.status import RunStatus


class StallWatchdog:
    """Call :meth:`beat` whenever the rank makes progress; :meth:`close` at the end.

    Args:
        world_size: the job's ranks, servers included.
        awaited: whom this rank waits for inside a step (the strategy knows: a parameter-server
            worker waits for its servers, not for the other workers).
        role: this rank's role, named where a job has ranks of several roles ("" otherwise).
        status: the run's status marker, told of the stall before the job is aborted (an
            aborted job's exit status may say 0: ``mpirun --enable-recovery``).
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int, awaited: str = "the other ranks",
                 role: str = "", status: RunStatus | None = None) -> None:
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.awaited, self.role, self.status = awaited, role, status
        self.step = 0
        self._last = time.monotonic()
        self._paused = False
        self._closed = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hvdllm-stall-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """This rank has completed ``step`` (or a long phase such as an evaluation); a pause ends."""
        self.step, self._last, self._paused = step, time.monotonic(), False

    def pause(self) -> None:
        """No step is due until the next beat (Horovod elastic re-forming its workers, which
        waits as long as its own --elastic-timeout)."""
        self._paused = True

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        # Check several times per timeout, so the job ends at most a quarter late.
        interval = min(5.0, self.timeout_s / 4)
        checked = time.monotonic()
        while not self._closed.wait(interval):
            now = time.monotonic()
            # This thread itself did not run for long: the whole process was frozen (SIGSTOP,
            # a hung node) and has just woken, so this rank is the one that fell behind.
            frozen = now - checked > interval + self.timeout_s / 2
            checked = now
            if now - self._last > self.timeout_s and not self._paused:
                self._abort(now - self._last, frozen)

    def _abort(self, waited: float, frozen: bool) -> None:
        where = f"error: stall: rank {self.rank} of {self.world_size}" + (f" ({self.role})" if self.role else "")
        if frozen:
            why = f"was itself frozen (stopped or hung) for about {waited:.0f} s: it is the rank behind"
        else:
            peers = self.awaited if self.world_size > 1 else "its own step (one rank: a hang inside it)"
            why = (f"completed step {self.step} and has waited {waited:.0f} s for {peers}: a rank that is "
                   f"stopped, hung or on a dead node is behind")
        line = f"{where} {why} (train.stall_timeout_s={self.timeout_s:g}); aborting the job"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if self.status is not None:
            self.status.failed(line)
        abort_job()
