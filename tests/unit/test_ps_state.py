"""The parameter server's state machine (hvdllm/parallel/ps_state.py) in one process, without
MPI: played under every order in which the messages of a few workers can reach it (each
worker sends its next message only once answered), with a worker that falls silent at any
point or never, and a non-finite push or none. Every run checks that no reply breaks the
staleness bound, that every push is applied exactly once or dropped, that s = 0 applies
each clock's mean in one update, and the final counts."""

from __future__ import annotations

import copy
import math
import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from hvdllm.config.sections import ParallelConfig
from hvdllm.parallel.load_balance import BatchSplitter
from hvdllm.parallel.ps_protocol import PUSH_HEADER, STEP_HEADER, Kind
from hvdllm.parallel.ps_state import ServerState


class RecordingShard:
    """A stand-in for ps_shard.ServerShard: one weight, plain SGD at lr 1, and a record of
    every update it was asked for (Python floats: the enumeration copies it at every branch)."""

    def __init__(self) -> None:
        self.weights = torch.zeros(1)
        self.accumulated = self.mean = 0.0
        self.means: list[tuple[int, float]] = []  # s = 0: (clock, the mean it stepped on)
        self.pushes: list[float] = []  # s > 0: the gradients it stepped on, one by one

    def accumulate(self, gradient: torch.Tensor) -> None:
        self.accumulated += gradient.item()

    def take_mean(self, weight: float) -> float:
        self.mean, self.accumulated = self.accumulated / weight, 0.0
        return abs(self.mean)

    def step_on_mean(self, clock: int, norm: float) -> None:
        self.means.append((clock, self.mean))
        self.weights -= self.mean

    def step_on_push(self, gradient: torch.Tensor, lr: float) -> None:
        self.pushes.append(gradient.item())
        self.weights -= lr * gradient

    def lr_at(self, version: int) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {"model": {"flat": self.weights.clone()}}

    def load_state_dict(self, state: dict) -> None:
        self.weights.copy_(state["model"]["flat"])


def server(workers: int, s: int, continue_without_dead: bool = True) -> ServerState:
    parallel = ParallelConfig(strategy="async", servers=1, max_staleness=s, continue_without_dead=continue_without_dead)
    return ServerState(RecordingShard(), workers, parallel, BatchSplitter(workers, workers, False),
                       save=lambda step, state: None, timer=lambda: 0.0)


def gradient_of(worker: int, clock: int) -> float:
    """Each push's own gradient, so that the record tells which push an update came from."""
    return float(1 + worker + 10 * clock)


def push_message(clock: int, gradient: float, nonfinite: bool = False) -> tuple[np.void, torch.Tensor]:
    header = np.zeros(1, dtype=PUSH_HEADER)[0]
    header["clock"], header["loss"], header["samples"] = clock, 1.0, 1.0
    header["nonfinite"] = float(nonfinite)
    return header, torch.tensor([gradient], dtype=torch.float32).view(torch.uint8)


def step_message(step: int) -> np.void:
    header = np.zeros(1, dtype=STEP_HEADER)[0]
    header["step"] = step
    return header


@dataclass
class Worker:
    """A worker's program: PULL, PUSH of clocks 0 .. clocks - 1, DONE; it waits for the
    parameters after each PULL or PUSH."""

    index: int
    clocks: int
    sent: int = 0  # messages sent so far
    waiting: bool = False
    dead: bool = False
    woke: bool = False

    @property
    def finished(self) -> bool:
        return self.sent == self.clocks + 2

    @property
    def pushes(self) -> int:
        return max(0, min(self.sent - 1, self.clocks))


@dataclass
class World:
    """The server, its workers, and what the checks need: the pushes it received."""

    state: ServerState
    workers: list[Worker]
    s: int
    nan_push: tuple[int, int] | None  # (worker, clock) whose push is not finite
    received: dict[int, list[tuple[int, float, bool]]] = field(default_factory=dict)  # clock -> pushes
    log: list[str] = field(default_factory=list)

    def fork(self) -> World:
        dtype = self.state.reply_dtype  # immutable, and slow to copy
        return copy.deepcopy(self, {id(dtype): dtype})

    def key(self) -> bytes:
        """The state the future depends on: the workers' progress, and the server's fields
        (as stored: two orders that differ only in a dict's order count as two states)."""
        server = {name: value for name, value in vars(self.state).items()
                  if name not in ("shard", "splitter", "save", "timer", "reply_dtype")}
        shard = self.state.shard
        return pickle.dumps(([vars(w) for w in self.workers], server, shard.weights.item(), shard.accumulated,
                             shard.means, sorted(shard.pushes), self.state.splitter.samples))

    def events(self, victim: int | None) -> list[tuple[str, int]]:
        """What can happen next: a live worker not waiting sends; the victim falls silent;
        a silent victim wakes and sends what it had pending (once)."""
        events = [("send", w.index) for w in self.workers if not (w.dead or w.waiting or w.finished)]
        if victim is not None:
            worker = self.workers[victim]
            if not worker.dead and not worker.finished:
                events.append(("timeout", victim))
            if worker.dead and not worker.woke and not worker.finished:
                events.append(("wake", victim))
        return events

    def play(self, event: tuple[str, int]) -> None:
        what, index = event
        self.log.append(f"{what} {index}")
        worker = self.workers[index]
        if what == "timeout":
            worker.dead = True
            self.check(self.state.on_timeout([index]))
        elif what == "wake":
            worker.woke = True
            kind, header, body = self.next_message(worker, record=False)
            assert [(send.worker, send.kind) for send in self.state.receive(index, kind, header, body)] == \
                [(index, Kind.END)], self.log
        else:
            kind, header, body = self.next_message(worker, record=True)
            worker.sent += 1
            worker.waiting = kind in (Kind.PULL, Kind.PUSH)
            self.check(self.state.receive(index, kind, header, body))

    def next_message(self, worker: Worker, record: bool):
        if worker.sent == 0:
            header, _ = push_message(0, 0.0)
            return Kind.PULL, header, torch.empty(0, dtype=torch.uint8)
        if worker.sent == worker.clocks + 1:
            return Kind.DONE, step_message(worker.clocks), torch.empty(0, dtype=torch.uint8)
        clock = worker.sent - 1
        nonfinite = self.nan_push == (worker.index, clock)
        gradient = gradient_of(worker.index, clock)
        if record:
            self.received.setdefault(clock, []).append((worker.index, gradient, nonfinite))
        return (Kind.PUSH, *push_message(clock, gradient, nonfinite))

    def truth_version(self) -> int:
        """Clocks every worker still counted has pushed, from the workers' side."""
        counted = [w.pushes for w in self.workers if not w.dead]
        return min(counted) if counted else max(w.pushes for w in self.workers)

    def check(self, sends) -> None:
        for send in sends:
            worker = self.workers[send.worker]
            if send.kind == Kind.END:
                assert worker.dead, self.log  # only a silent worker is sent away
                continue
            assert send.kind == Kind.PARAMS and worker.waiting and not worker.dead, self.log
            wanted = worker.pushes  # the clock it computes next
            version = self.truth_version()
            assert wanted - self.s <= version <= wanted, (wanted, version, self.log)  # the staleness bound
            assert send.header["version"] == version, self.log
            worker.waiting = False


def schedules(world: World, victim: int | None, seen: set[bytes] | None = None):
    """Every end state reachable from ``world`` (depth first, the world copied at each
    branch). Orders that lead to the same state of the server and the workers go on alike,
    so each such state is explored once (the checks on the way there were made on each)."""
    seen = set() if seen is None else seen
    key = world.key()
    if key in seen:
        return
    seen.add(key)
    events = world.events(victim)
    if not events:
        yield world
        return
    for event in events:
        branch = world.fork() if event is not events[-1] else world
        branch.play(event)
        yield from schedules(branch, victim, seen)


def check_end(world: World) -> None:
    state, shard = world.state, world.state.shard
    assert all(w.finished or w.dead for w in world.workers), world.log  # nobody waits for ever
    assert state.finished and not state.waiting, world.log
    pushes = [(clock, *push) for clock, clock_pushes in world.received.items() for push in clock_pushes]
    assert state.applied + state.dropped == len(pushes), world.log
    assert sum(state.hist) == state.applied
    if world.s == 0:
        # One update per clock, in clock order, on the mean of exactly that clock's pushes;
        # a clock with a non-finite push is skipped whole.
        expected = [(clock, sum(g for _, g, _ in ps) / len(ps)) for clock, ps in sorted(world.received.items())
                    if not any(bad for _, _, bad in ps)]
        assert [clock for clock, _ in shard.means] == [clock for clock, _ in expected], world.log
        assert all(math.isclose(got, want) for (_, got), (_, want) in zip(shard.means, expected)), world.log
        assert state.updates == len(expected) and state.norms.keys() == world.received.keys()
    else:
        # Every finite push applied exactly once, every non-finite one dropped.
        assert sorted(shard.pushes) == sorted(g for _, _, g, bad in pushes if not bad), world.log
        assert state.dropped == sum(bad for *_, bad in pushes) and state.updates == len(shard.pushes)
    live = [w for w in world.workers if not w.dead]
    assert state.version == world.workers[0].clocks and all(w.pushes == w.clocks for w in live)
    assert state.pushed == [w.pushes for w in world.workers], world.log


@pytest.mark.parametrize("workers, clocks", [(2, 4), (3, 3)])
@pytest.mark.parametrize("s", [0, 1])
@pytest.mark.parametrize("victim", [None, 1], ids=["no-timeout", "worker-1-silent"])
@pytest.mark.parametrize("nan_push", [None, (0, 1)], ids=["finite", "nan-push"])
def test_every_message_order_keeps_the_bound_and_applies_each_push_once(workers, clocks, s, victim, nan_push):
    start = World(server(workers, s), [Worker(w, clocks) for w in range(workers)], s, nan_push)
    seen: set[bytes] = set()
    for end in schedules(start, victim, seen):
        check_end(end)
    assert len(seen) > 20  # the orders were really enumerated (2 workers, 4 clocks, s = 0: 21 states)


def push(state: ServerState, worker: int, clock: int, gradient: float):
    header, body = push_message(clock, gradient)
    return state.on_push(worker, header, body.view(torch.float32))


def test_the_last_push_of_a_clock_releases_the_waiting_workers_for_s_0():
    state = server(workers=2, s=0)
    assert [send.worker for w in (0, 1) for send in state.on_pull(w, 0)] == [0, 1]  # clock 0 needs nobody
    assert push(state, 0, 0, 1.0) == []  # worker 1 has not pushed clock 0
    sends = push(state, 1, 0, 3.0)
    assert sorted(send.worker for send in sends) == [0, 1] and state.shard.means == [(0, 2.0)]
    assert all(send.header["version"] == 1 and send.header["weight"] == 2 for send in sends)


def test_with_s_1_a_worker_runs_one_clock_ahead_and_no_further():
    state = server(workers=2, s=1)
    state.on_pull(0, 0)
    state.on_pull(1, 0)
    assert [send.worker for send in push(state, 0, 0, 1.0)] == [0]
    assert push(state, 0, 1, 2.0) == []  # its clock 2 would miss 2 clocks of worker 1's
    sends = push(state, 1, 0, 3.0)
    assert sorted(send.worker for send in sends) == [0, 1] and state.hist == [2, 1]


def test_a_death_worker_0_cannot_survive_ends_the_job_telling_the_others():
    state = server(workers=3, s=0)
    sends = state.on_timeout([0])
    assert state.ending and [(send.worker, send.kind) for send in sends] == [(1, Kind.END), (2, Kind.END)]
    state = server(workers=3, s=0, continue_without_dead=False)
    sends = state.on_timeout([2])
    assert state.ending and [send.worker for send in sends] == [0, 1]


def test_a_checkpoint_is_written_once_every_live_worker_has_pushed_its_step():
    saved = []
    state = server(workers=2, s=1)
    state.save = lambda step, shard_state: saved.append((step, shard_state["counters"]["applied"]))
    state.on_pull(0, 0)
    state.on_pull(1, 0)
    push(state, 0, 0, 1.0)
    assert state.on_checkpoint(1) == [] and saved == []  # worker 1's first push is not in yet
    sends = push(state, 1, 0, 1.0)
    assert saved == [(1, 2)] and (0, Kind.CHECKPOINT) in [(send.worker, send.kind) for send in sends]


def test_every_worker_evaluates_the_snapshot_the_first_one_asked_for():
    state = server(workers=2, s=1)
    state.on_pull(0, 0)
    state.on_pull(1, 0)
    first = state.on_evaluate(0, 4)[0]
    push(state, 0, 0, 1.0)  # the weights move on
    second = state.on_evaluate(1, 4)[0]
    assert first.kind == second.kind == Kind.EVALUATE and torch.equal(first.body, second.body)
    assert not torch.equal(second.body, state.shard.weights) and not state.snapshots
