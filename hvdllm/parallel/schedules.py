"""Pipeline schedules as data: each rank's ordered actions ``Action(stage, op, micro)`` for one
batch, written compute-only; :func:`add_communication` adds the transfers and :func:`simulate`
proves order, matching sends, no deadlock and the peak of in-flight activations.
The schedules and their bubbles: docs/design/parallel.md (Pipeline schedules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FORWARD, BACKWARD = "forward", "backward"
RECV_ACT, SEND_ACT, RECV_GRAD, SEND_GRAD = "recv_act", "send_act", "recv_grad", "send_grad"
COMPUTE = (FORWARD, BACKWARD)
SYMBOLS = {FORWARD: "F", BACKWARD: "B", RECV_ACT: "ra", SEND_ACT: "sa", RECV_GRAD: "rg", SEND_GRAD: "sg"}


@dataclass(frozen=True)
class Action:
    stage: int  # the pipeline stage (model part) it runs on, or whose input/output it moves
    op: str  # FORWARD, BACKWARD, or one of the four communication operations
    micro: int  # micro-batch index

    def __str__(self) -> str:
        return f"{self.stage}{SYMBOLS[self.op]}{self.micro}"


RankActions = list[Action]


def gpipe(ranks: int, micro_batches: int) -> list[RankActions]:
    """All forwards, then all backwards, on every rank (one stage per rank)."""
    return [[Action(r, FORWARD, i) for i in range(micro_batches)] +
            [Action(r, BACKWARD, i) for i in range(micro_batches)] for r in range(ranks)]


def one_f_one_b(ranks: int, micro_batches: int) -> list[RankActions]:
    """Warm-up forwards, then one forward one backward, then the remaining backwards."""
    schedule = []
    for r in range(ranks):
        warmup = min(ranks - r - 1, micro_batches)
        actions = [Action(r, FORWARD, i) for i in range(warmup)]
        for i in range(micro_batches - warmup):
            actions += [Action(r, FORWARD, warmup + i), Action(r, BACKWARD, i)]
        actions += [Action(r, BACKWARD, i) for i in range(micro_batches - warmup, micro_batches)]
        schedule.append(actions)
    return schedule


SCHEDULES: dict[str, Callable[[int, int], list[RankActions]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def stage_rank(stage: int, ranks: int) -> int:
    """The rank that holds ``stage``: stages loop over the ranks."""
    return stage % ranks


def add_communication(compute: list[RankActions], stages: int) -> list[RankActions]:
    """The compute schedule with the transfers between stages on different ranks: a
    receive right before the forward (backward) that needs it, a send right after the
    forward (backward) that made it."""
    ranks = len(compute)

    def remote(a: int, b: int) -> bool:
        return stage_rank(a, ranks) != stage_rank(b, ranks)

    result = []
    for actions in compute:
        full = []
        for action in actions:
            s, i = action.stage, action.micro
            if action.op == FORWARD:
                if s > 0 and remote(s - 1, s):
                    full.append(Action(s, RECV_ACT, i))
                full.append(action)
                if s < stages - 1 and remote(s, s + 1):
                    full.append(Action(s, SEND_ACT, i))
            elif action.op == BACKWARD:
                if s < stages - 1 and remote(s, s + 1):
                    full.append(Action(s, RECV_GRAD, i))
                full.append(action)
                if s > 0 and remote(s - 1, s):
                    full.append(Action(s, SEND_GRAD, i))
            else:
                raise ValueError(f"a compute schedule holds only forwards and backwards, not {action}")
        result.append(full)
    return result


def build_schedule(name: str, ranks: int, micro_batches: int) -> list[RankActions]:
    """Every rank's actions, communication included, for schedule ``name``."""
    return add_communication(SCHEDULES[name](ranks, micro_batches), ranks)


@dataclass
class Simulation:
    order: list[tuple[int, Action]]  # (rank, action) in one order the ranks can run in
    peak_activations: list[int]  # per rank: most (stage, micro-batch) forwarded and not yet backwarded


def simulate(schedule: list[RankActions], stages: int | None = None) -> Simulation:
    """Run every rank's actions with non-blocking sends and blocking receives, always
    advancing the lowest rank that can; raises RuntimeError on a deadlock or an action that
    breaks the pipeline's rules (a forward before its input exists, a backward before its
    forward or before the gradient of its output exists, a send of nothing, a computation done
    twice); at the end, every send must have been received and every stage must have run the
    forward and backward of every micro-batch."""
    ranks = len(schedule)
    stages = stages if stages is not None else 1 + max((a.stage for actions in schedule for a in actions), default=0)
    position = [0] * ranks
    in_flight: set[tuple[str, int, int]] = set()  # (act | grad, receiving stage, micro) sent, not yet received
    received: set[tuple[str, int, int]] = set()
    done: set[tuple[str, int, int]] = set()  # (op, stage, micro) computed
    held = [set() for _ in range(ranks)]
    peak = [0] * ranks
    order = []

    def ready(rank: int, action: Action) -> bool:
        s, i = action.stage, action.micro
        if action.op == RECV_ACT:
            return ("act", s, i) in in_flight
        if action.op == RECV_GRAD:
            return ("grad", s, i) in in_flight
        return True

    while any(position[r] < len(schedule[r]) for r in range(ranks)):
        for r in range(ranks):
            if position[r] == len(schedule[r]) or not ready(r, schedule[r][position[r]]):
                continue
            action = schedule[r][position[r]]
            _apply(r, action, stages, ranks, in_flight, received, done, held[r])
            peak[r] = max(peak[r], len(held[r]))
            order.append((r, action))
            position[r] += 1
            break
        else:
            raise RuntimeError(f"deadlock: every rank waits (positions {position})")
    _check_complete(stages, in_flight, done, schedule)
    return Simulation(order, peak)


def _check_complete(stages: int, in_flight: set, done: set, schedule: list[RankActions]) -> None:
    """Every send was received, and every stage forwarded and backwarded every micro-batch once
    (a stray message would be taken by the next batch, whose tags are the same)."""
    if in_flight:
        kind, stage, micro = sorted(in_flight)[0]
        raise RuntimeError(f"{kind} of micro-batch {micro} sent to stage {stage} is never received")
    micro_batches = {a.micro for actions in schedule for a in actions}
    for op in (FORWARD, BACKWARD):
        missing = [(s, i) for s in range(stages) for i in sorted(micro_batches) if (op, s, i) not in done]
        if missing:
            raise RuntimeError(f"stage {missing[0][0]} never runs the {op} of micro-batch {missing[0][1]}")


def _apply(rank: int, action: Action, stages: int, ranks: int, in_flight: set, received: set, done: set,
           held: set) -> None:
    s, i, op = action.stage, action.micro, action.op
    if stage_rank(s, ranks) != rank:
        raise RuntimeError(f"rank {rank}: {action} runs stage {s}, which lives on rank {stage_rank(s, ranks)}")
    where = f"rank {rank}, stage {s}"
    if op in (RECV_ACT, RECV_GRAD):
        kind = "act" if op == RECV_ACT else "grad"
        in_flight.discard((kind, s, i))
        received.add((kind, s, i))
    elif op == FORWARD:
        if s > 0 and ("forward", s - 1, i) not in done:
            raise RuntimeError(f"{where}: forward of micro-batch {i} before stage {s - 1} computed its input")
        if s > 0 and stage_rank(s - 1, ranks) != rank and ("act", s, i) not in received:
            raise RuntimeError(f"{where}: forward of micro-batch {i} before receiving its input")
        if ("forward", s, i) in done:
            raise RuntimeError(f"{where}: forward of micro-batch {i} twice")
        done.add(("forward", s, i))
        held.add((s, i))
    elif op == BACKWARD:
        if ("forward", s, i) not in done:
            raise RuntimeError(f"{where}: backward of micro-batch {i} before its forward")
        if s < stages - 1 and ("backward", s + 1, i) not in done:
            raise RuntimeError(f"{where}: backward of micro-batch {i} before stage {s + 1} computed its gradient")
        if s < stages - 1 and stage_rank(s + 1, ranks) != rank and ("grad", s, i) not in received:
            raise RuntimeError(f"{where}: backward of micro-batch {i} before receiving its output's gradient")
        if ("backward", s, i) in done:
            raise RuntimeError(f"{where}: backward of micro-batch {i} twice")
        done.add(("backward", s, i))
        held.discard((s, i))
    elif op == SEND_ACT:
        if ("forward", s, i) not in done:
            raise RuntimeError(f"{where}: sends activations of micro-batch {i} before computing them")
        in_flight.add(("act", s + 1, i))
    elif op == SEND_GRAD:
        if ("backward", s, i) not in done:
            raise RuntimeError(f"{where}: sends gradients of micro-batch {i} before its backward")
        in_flight.add(("grad", s - 1, i))
    else:
        raise RuntimeError(f"{where}: unknown operation {op!r}")


def peak_activations(name: str, ranks: int, micro_batches: int) -> list[int]:
    """Micro-batches whose activations each rank holds at its peak under schedule ``name``."""
    return simulate(build_schedule(name, ranks, micro_batches)).peak_activations


def bubble_fraction(ranks: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """The idle share of a pipeline step with equal stages: ``(p - 1) / (v m + p - 1)``."""
    return (ranks - 1) / (virtual_stages * micro_batches + ranks - 1)


def schedule_table(schedule: list[RankActions]) -> list[str]:
    """The compute actions as a time table, one row per rank, one column per time slot of a
    forward or backward (each taking one slot, transfers free): where the bubble is."""
    stages = 1 + max(a.stage for actions in schedule for a in actions)
    slot_of: dict[tuple[str, int, int], int] = {}
    free_at = [0] * len(schedule)
    cells: list[dict[int, str]] = [{} for _ in schedule]
    pending = [[a for a in actions if a.op in COMPUTE] for actions in schedule]
    while any(pending):
        progressed = False
        for r, actions in enumerate(pending):
            if not actions:
                continue
            action = actions[0]
            s, i = action.stage, action.micro
            needs = [("forward", s - 1, i)] if action.op == FORWARD and s > 0 else []
            if action.op == BACKWARD:
                needs = [("forward", s, i)] + ([("backward", s + 1, i)] if s < stages - 1 else [])
            if any(n not in slot_of for n in needs):
                continue
            start = max([free_at[r]] + [slot_of[n] + 1 for n in needs])
            slot_of[(action.op, s, i)] = start
            cells[r][start] = str(action)
            free_at[r] = start + 1
            actions.pop(0)
            progressed = True
        if not progressed:
            raise RuntimeError("the schedule cannot run: every rank waits")
    width = max(len(text) for row in cells for text in row.values())
    slots = max(free_at)
    return [f"rank {r}: " + " ".join(row.get(t, ".").rjust(width) for t in range(slots))
            for r, row in enumerate(cells)]
