"""Cutting a GPT into k contiguous pipeline stages, exactly balanced (the linear partition
dynamic programme) by a chosen cost: params, flops or memory.
The costs and why the cut is exact: docs/design/parallel.md (The pipeline cut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from hvdllm.errors import UserError


@dataclass(frozen=True)
class UnitCosts:
    embedding: float
    blocks: tuple[float, ...]
    head: float
    activations: tuple[float, ...] = ()  # per block and held micro-batch (``memory`` only)


def stage_costs(costs: UnitCosts, blocks_per_stage: Sequence[int], held: Callable[[int], int] = lambda s: 0
                ) -> list[float]:
    """The cost of each stage of a cut given as blocks per stage."""
    result, start = [], 0
    last = len(blocks_per_stage) - 1
    for stage, count in enumerate(blocks_per_stage):
        stop = start + count
        cost = sum(costs.blocks[start:stop])
        if costs.activations:
            cost += sum(costs.activations[start:stop]) * held(stage)
        cost += (costs.embedding if stage == 0 else 0.0) + (costs.head if stage == last else 0.0)
        result.append(cost)
        start = stop
    return result


def balanced_cut(costs: UnitCosts, stages: int, held: Callable[[int], int] = lambda s: 0) -> list[int]:
    """Blocks per stage minimising the largest stage cost (ties: the earliest such cut).

    ``held(stage)`` is the number of micro-batches whose activations the stage keeps, which
    weighs ``costs.activations``.
    """
    n = len(costs.blocks)
    if not 1 <= stages <= n:
        raise UserError(f"parallel.pipeline={stages} stages need at least one block each; the model has {n}")
    prefix, act_prefix = [0.0], [0.0]
    for block, act in zip(costs.blocks, costs.activations or [0.0] * n):
        prefix.append(prefix[-1] + block)
        act_prefix.append(act_prefix[-1] + act)

    def segment(stage: int, start: int, stop: int) -> float:  # blocks [start, stop) as `stage`
        cost = prefix[stop] - prefix[start] + (act_prefix[stop] - act_prefix[start]) * held(stage)
        return cost + (costs.embedding if stage == 0 else 0.0) + (costs.head if stage == stages - 1 else 0.0)

    inf = float("inf")
    # best[s][j]: the smallest possible largest cost when stages 0..s hold blocks [0, j).
    best = [[inf] * (n + 1) for _ in range(stages)]
    split = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        best[0][j] = segment(0, 0, j)
    for s in range(1, stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):  # stage s holds blocks [i, j)
                worst = max(best[s - 1][i], segment(s, i, j))
                if worst < best[s][j]:
                    best[s][j], split[s][j] = worst, i
    bounds, j = [], n
    for s in range(stages - 1, 0, -1):
        i = split[s][j]
        bounds.append(j - i)
        j = i
    bounds.append(j)
    return bounds[::-1]


def check_manual_cut(stage_layers: Sequence[int], stages: int, n_layer: int) -> list[int]:
    """``parallel.stage_layers`` checked against the layout and the model."""
    if len(stage_layers) != stages:
        raise UserError(f"parallel.stage_layers has {len(stage_layers)} entries for parallel.pipeline={stages} "
                        f"stages: give one block count per stage")
    if sum(stage_layers) != n_layer:
        raise UserError(f"parallel.stage_layers {list(stage_layers)} sums to {sum(stage_layers)}, "
                        f"but the model has {n_layer} blocks (model.n_layer)")
    return list(stage_layers)


def imbalance(costs: Sequence[float]) -> float:
    """Largest stage over the mean stage: 1.0 is a perfect balance."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0
