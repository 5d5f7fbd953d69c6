"""Pipeline schedules as data: each stage's ordered actions for one batch of m micro-batches.

As in ``torch.distributed.pipelining``, a schedule is produced by a pure function and run by
a separate executor (:mod:`hvdllm.parallel.pipeline`), so its properties (every forward
before its backward, sends matching receives, no deadlock, peak activations) are tested in
one process by :func:`simulate`.

Sends are non-blocking and receives block, which is how the executor runs them over MPI.

- GPipe (Huang et al. 2019): all m forwards, then all m backwards; a stage holds the
  activations of all m micro-batches at its peak.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021): stage s runs ``min(p - s - 1, m)`` warm-up
  forwards, then alternates one forward and one backward, then drains the backwards; it holds
  at most ``p - s`` micro-batches. Both have the bubble ``(p - 1) / (m + p - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

RECV_ACT, FORWARD, SEND_ACT, RECV_GRAD, BACKWARD, SEND_GRAD = (
    "recv_act", "forward", "send_act", "recv_grad", "backward", "send_grad")


@dataclass(frozen=True)
class Action:
    op: str  # one of the six above
    micro: int  # micro-batch index


def _forward(stage: int, stages: int, micro: int) -> list[Action]:
    return ([Action(RECV_ACT, micro)] if stage > 0 else []) + [Action(FORWARD, micro)] + (
        [Action(SEND_ACT, micro)] if stage < stages - 1 else [])


def _backward(stage: int, stages: int, micro: int) -> list[Action]:
    return ([Action(RECV_GRAD, micro)] if stage < stages - 1 else []) + [Action(BACKWARD, micro)] + (
        [Action(SEND_GRAD, micro)] if stage > 0 else [])


def gpipe(stage: int, stages: int, micro_batches: int) -> list[Action]:
    actions = []
    for i in range(micro_batches):
        actions += _forward(stage, stages, i)
    for i in range(micro_batches):
        actions += _backward(stage, stages, i)
    return actions


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[Action]:
    warmup = min(stages - stage - 1, micro_batches)
    actions = []
    for i in range(warmup):
        actions += _forward(stage, stages, i)
    for i in range(micro_batches - warmup):
        actions += _forward(stage, stages, warmup + i) + _backward(stage, stages, i)
    for i in range(micro_batches - warmup, micro_batches):
        actions += _backward(stage, stages, i)
    return actions


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build_schedule(name: str, stage: int, stages: int, micro_batches: int) -> list[Action]:
    return SCHEDULES[name](stage, stages, micro_batches)


@dataclass
class Simulation:
    order: list[tuple[int, Action]]  # (stage, action) in one order the stages can run in
    peak_activations: list[int]  # per stage: most micro-batches forwarded and not yet backwarded


def simulate(schedules: list[list[Action]]) -> Simulation:
    """Run every stage's actions with non-blocking sends and blocking receives, always
    advancing the lowest stage that can; raises RuntimeError on a deadlock or an action that
    breaks the pipeline's rules (a backward before its forward, a send of nothing)."""
    stages = len(schedules)
    position = [0] * stages
    sent: set[tuple[str, int, int, int]] = set()  # (kind, from, to, micro)
    forwarded: list[set[int]] = [set() for _ in range(stages)]
    done_backward: list[set[int]] = [set() for _ in range(stages)]
    peak = [0] * stages
    order = []
    while any(position[s] < len(schedules[s]) for s in range(stages)):
        for s in range(stages):
            if position[s] == len(schedules[s]):
                continue
            action = schedules[s][position[s]]
            if action.op == RECV_ACT and ("act", s - 1, s, action.micro) not in sent:
                continue
            if action.op == RECV_GRAD and ("grad", s + 1, s, action.micro) not in sent:
                continue
            _check(s, action, forwarded[s], done_backward[s])
            if action.op == FORWARD:
                forwarded[s].add(action.micro)
                peak[s] = max(peak[s], len(forwarded[s] - done_backward[s]))
            elif action.op == BACKWARD:
                done_backward[s].add(action.micro)
            elif action.op == SEND_ACT:
                sent.add(("act", s, s + 1, action.micro))
            elif action.op == SEND_GRAD:
                sent.add(("grad", s, s - 1, action.micro))
            order.append((s, action))
            position[s] += 1
            break
        else:
            raise RuntimeError(f"deadlock: every stage waits (positions {position})")
    return Simulation(order, peak)


def _check(stage: int, action: Action, forwarded: set[int], done_backward: set[int]) -> None:
    if action.op == BACKWARD and action.micro not in forwarded:
        raise RuntimeError(f"stage {stage}: backward of micro-batch {action.micro} before its forward")
    if action.op == SEND_ACT and action.micro not in forwarded:
        raise RuntimeError(f"stage {stage}: sends activations of micro-batch {action.micro} before computing them")
    if action.op == SEND_GRAD and action.micro not in done_backward:
        raise RuntimeError(f"stage {stage}: sends gradients of micro-batch {action.micro} before its backward")
