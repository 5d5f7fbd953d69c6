"""A parameter server as a state machine: each ``on_*`` takes one message (or a timeout) and
returns the messages to send. No MPI and no clock of its own, so every order of messages can
be played in one process (tests/unit/test_ps_state.py); server_loop.py is the pump that feeds
it. The rules (staleness bound, the s = 0 mean, dead workers, checkpoints) are in
docs/design/parameter-server.md.
"""

from __future__ import annotations

import math
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hvdllm.parallel.load_balance import BatchSplitter
from hvdllm.parallel.ps_protocol import Kind, reply_header


@dataclass
class Send:
    """A message to a worker. ``body`` may be a view of the live weights: the pump copies it
    into the message before it calls the state machine again."""

    worker: int
    kind: Kind
    header: np.void | None = None
    body: torch.Tensor | bytes | None = None


@dataclass
class ClockTotals:
    """A clock's pushes as far as this server has them: their summed statistics, their weight
    (what the s = 0 mean divides by: samples under load_balance, else 1 each) and number."""

    loss: float = 0.0
    nonfinite: float = 0.0
    stop: float = 0.0
    weight: float = 0.0
    pushes: int = 0


class ServerState:
    """One server's protocol state over ``workers`` workers. ``shard`` does the arithmetic
    (ps_shard.ServerShard, or a stand-in in tests); ``save(step, state)`` writes a checkpoint."""

    def __init__(self, shard, workers: int, parallel, splitter: BatchSplitter, save: Callable[[int, dict], None],
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.shard, self.workers, self.splitter, self.save, self.timer = shard, workers, splitter, save, timer
        self.s = parallel.max_staleness
        self.weigh_by_samples = parallel.load_balance
        self.staleness_lr = parallel.staleness_lr
        self.continue_without_dead = parallel.continue_without_dead
        self.reply_dtype = reply_header(self.s)
        self.pushed = [0] * workers  # pushes per worker: the clock it is at
        self.sent_version = [0] * workers  # the version of the parameters each worker last had
        self.done: set[int] = set()  # said DONE or declared dead
        self.dead: list[int] = []
        self.ending = False  # a death the job cannot go on without: the pump ends the job
        self.waiting: dict[int, tuple[int, float]] = {}  # worker -> (clock it wants parameters for, since)
        self.totals: dict[int, ClockTotals] = defaultdict(ClockTotals)
        self.pushers: dict[int, set[int]] = defaultdict(set)  # s = 0: who pushed the open clock
        self.norms: dict[int, float] = {}  # s = 0: each clock's global gradient norm
        self.updates = self.applied = self.dropped = 0
        self.hist = [0] * (self.s + 1)  # applied pushes by staleness
        self.stop_at = -1  # the clock every worker stops at (-1: none yet)
        self.stop_requested = False  # a signal reached this server
        self.checkpoint_due: int | None = None  # the step worker 0 asked to checkpoint
        self.snapshots: dict[int, tuple[np.void, torch.Tensor, set[int]]] = {}  # step -> (header, weights, served)
        self.gathers: dict[int, dict[int, bytes]] = defaultdict(dict)  # round -> worker -> part
        self.queue_s = self.queue_max_s = 0.0
        self.replies = 0

    @property
    def live(self) -> set[int]:
        return set(range(self.workers)) - self.done

    @property
    def version(self) -> int:
        """Clocks complete: every live worker has pushed them (all applied, for s = 0)."""
        live = [self.pushed[w] for w in self.live]
        return min(live) if live else max(self.pushed)

    @property
    def finished(self) -> bool:
        return len(self.done) == self.workers

    # --- messages in ---------------------------------------------------------------------
    def receive(self, worker: int, kind: Kind, header: np.void | None, body: torch.Tensor) -> list[Send]:
        """Dispatch a decoded message (``body``: the bytes after its header)."""
        if worker in self.dead:
            return [Send(worker, Kind.END)]  # it was only stopped or slow, and has woken: it must go
        if kind == Kind.HEARTBEAT:
            return []
        if kind == Kind.PULL:
            return self.on_pull(worker, int(header["clock"]))
        if kind == Kind.PUSH:
            return self.on_push(worker, header, body.view(torch.float32))
        if kind == Kind.DONE:
            return self.on_done(worker)
        if kind == Kind.CHECKPOINT:
            return self.on_checkpoint(int(header["step"]))
        if kind == Kind.EVALUATE:
            return self.on_evaluate(worker, int(header["step"]))
        if kind == Kind.GATHER:
            return self.on_gather(worker, int(header["step"]), body.numpy().tobytes())
        raise ValueError(f"a parameter server does not take {kind!r} messages")

    def on_pull(self, worker: int, clock: int) -> list[Send]:
        """A worker's start: it wants the parameters of ``clock``."""
        self.waiting[worker] = (clock, self.timer())
        return self._progress()

    def on_push(self, worker: int, header: np.void, gradient: torch.Tensor) -> list[Send]:
        """A worker's gradient of clock ``header["clock"]``; it then wants the next clock's parameters."""
        clock = int(header["clock"])
        self._take_push(worker, clock, header, gradient)
        self.waiting[worker] = (clock + 1, self.timer())
        return self._progress()

    def on_done(self, worker: int) -> list[Send]:
        self.done.add(worker)
        return self._progress()

    def on_checkpoint(self, step: int) -> list[Send]:
        """Worker 0 asks for this server's shard of ``step``: written once every live worker
        has pushed ``step`` clocks, then answered."""
        self.checkpoint_due = step
        return self._progress()

    def on_evaluate(self, worker: int, step: int) -> list[Send]:
        """The weights to evaluate at ``step``: as they were when the first worker asked, for
        every worker (one copy, dropped once every live worker has had it)."""
        if step not in self.snapshots:
            self.snapshots[step] = (self._header(step, None), self.shard.weights.clone(), set())
        header, weights, served = self.snapshots[step]
        served.add(worker)
        if self.live <= served:
            del self.snapshots[step]
        return [Send(worker, Kind.EVALUATE, header, weights), *self._progress()]

    def on_gather(self, worker: int, round_: int, part: bytes) -> list[Send]:
        self.gathers[round_][worker] = part
        return self._progress()

    def on_timeout(self, workers: list[int]) -> list[Send]:
        """``workers`` fell silent. Without parallel.continue_without_dead, or when worker 0 (it
        writes the log and checkpoints) is among them, the job ends: END to the others, and
        :attr:`ending` set. Else the rest go on: END to the silent ones (a stopped one that
        wakes reads it and exits), and whatever their absence releases."""
        if not self.continue_without_dead or 0 in workers:
            self.ending = True
            return [Send(w, Kind.END) for w in sorted(self.live - set(workers))]
        self.dead += workers
        self.done.update(workers)
        for worker in workers:
            self.waiting.pop(worker, None)
        for step, (_, _, served) in list(self.snapshots.items()):
            if self.live <= served:
                del self.snapshots[step]
        return [*(Send(w, Kind.END) for w in workers), *self._progress()]

    def request_stop(self) -> None:
        """A signal (SIGTERM, SIGUSR1): the workers stop at a clock they can all still reach."""
        self.stop_requested = True

    # --- what a message releases -----------------------------------------------------------
    def _take_push(self, worker: int, clock: int, header: np.void, gradient: torch.Tensor) -> None:
        self.pushed[worker] = clock + 1
        totals = self.totals[clock]
        totals.loss += float(header["loss"])
        totals.nonfinite += float(header["nonfinite"])
        totals.stop += float(header["stop"])
        totals.weight += float(header["samples"]) if self.weigh_by_samples else 1.0
        totals.pushes += 1
        self.splitter.pushed(worker, int(header["samples"]), float(header["seconds"]))
        if (header["stop"] > 0 or self.stop_requested) and self.stop_at < 0:
            self.stop_at = max(self.pushed) + 1  # a clock no worker has passed: all can stop there
        finite = header["nonfinite"] == 0 and bool(torch.isfinite(gradient).all())
        staleness = clock - self.sent_version[worker]
        if self.s == 0:  # applied by _progress once every live worker has pushed this clock
            if finite:
                self.shard.accumulate(gradient)
            self.pushers[clock].add(worker)
        elif finite:
            lr = self.shard.lr_at(self.version) / (self.workers - len(self.dead))
            if self.staleness_lr:
                lr /= max(1, staleness)
            self.shard.step_on_push(gradient, lr)
            self.updates += 1
            self.applied += 1
            self.hist[staleness] += 1
        else:
            self.dropped += 1

    def _progress(self) -> list[Send]:
        """Whatever the last message or death allows: a clock's update, replies, gathers, a checkpoint."""
        if self.s == 0 and self.pushers:
            clock, pushers = next(iter(self.pushers.items()))
            if self.live <= pushers:
                self._apply_clock(clock)
        return [*self._answer(), *self._answer_gathers(), *self._checkpoint_if_due()]

    def _apply_clock(self, clock: int) -> None:
        """s = 0: one step on the mean of the clock's pushes, clipped by the global norm of
        that mean, as ``sync`` takes it; skipped when a push was not finite."""
        del self.pushers[clock]
        self.splitter.rebalance(self.live)
        totals = self.totals[clock]
        norm = self.norms[clock] = self.shard.take_mean(totals.weight)
        if totals.nonfinite > 0 or not math.isfinite(norm):
            self.dropped += totals.pushes  # as sync skips the step
            return
        self.shard.step_on_mean(clock, norm)
        self.updates += 1
        self.applied += totals.pushes
        self.hist[0] += totals.pushes

    def _answer(self) -> list[Send]:
        """Parameters to every waiting worker whose next clock the staleness bound now allows."""
        version, sends = self.version, []
        for worker, (wanted, since) in list(self.waiting.items()):
            if version < wanted - self.s:
                continue
            sends.append(Send(worker, Kind.PARAMS, self._header(wanted, worker), self.shard.weights))
            self.sent_version[worker] = version
            del self.waiting[worker]
            held = self.timer() - since
            self.queue_s += held
            self.queue_max_s = max(self.queue_max_s, held)
            self.replies += 1
        for old in [c for c in self.totals if c < version - 1]:
            del self.totals[old]  # every reply that could need it has been sent
        return sends

    def _header(self, wanted: int, worker: int | None) -> np.void:
        """The reply header for a worker that computes clock ``wanted`` next."""
        totals = self.totals.get(wanted - 1, ClockTotals())
        header = np.zeros(1, dtype=self.reply_dtype)[0]
        header["version"], header["updates"] = self.version, self.updates
        header["applied"], header["dropped"], header["stop_at"] = self.applied, self.dropped, self.stop_at
        header["loss"], header["nonfinite"], header["stop"] = totals.loss, totals.nonfinite, totals.stop
        header["weight"], header["norm"] = totals.weight, self.norms.get(wanted - 1, math.nan)
        header["dead"] = len(self.dead)
        header["span_start"], header["span_count"] = self.splitter.span(worker)
        header["hist"] = self.hist
        return header

    def _answer_gathers(self) -> list[Send]:
        """Each complete round of the workers' collective, back to its live workers (server 0)."""
        sends = []
        for round_, parts in list(self.gathers.items()):
            if not self.live <= parts.keys():
                continue
            reply = pickle.dumps([parts[w] for w in sorted(parts) if w not in self.dead])
            sends += [Send(w, Kind.GATHER, None, reply) for w in sorted(self.live & parts.keys())]
            del self.gathers[round_]
        return sends

    def _checkpoint_if_due(self) -> list[Send]:
        step = self.checkpoint_due
        if step is None or self.version < step:
            return []
        self.save(step, self.state_dict(step))
        self.checkpoint_due = None
        return [Send(0, Kind.CHECKPOINT)]

    # --- checkpoints and the summary -----------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        counters = {"updates": self.updates, "applied": self.applied, "dropped": self.dropped, "hist": list(self.hist)}
        return {**self.shard.state_dict(), "step": step, "counters": counters}

    def load_state_dict(self, state: dict) -> None:
        self.shard.load_state_dict(state)
        counters = state["counters"]
        self.updates, self.applied, self.dropped = counters["updates"], counters["applied"], counters["dropped"]
        self.hist = list(counters["hist"])
        self.pushed = [int(state["step"])] * self.workers  # every worker checkpointed at this clock
        self.sent_version = list(self.pushed)

    def summary(self) -> dict:
        return {"updates": self.updates, "applied_pushes": self.applied, "dropped_pushes": self.dropped,
                "staleness_hist": self.hist, "max_staleness": self.s, "dead_workers": self.dead,
                "pushes_per_worker": self.pushed, "samples_per_worker": self.splitter.samples,
                "queue_s_mean": self.queue_s / max(1, self.replies), "queue_s_max": self.queue_max_s}
