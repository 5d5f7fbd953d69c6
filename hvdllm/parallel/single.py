"""One process, nothing to exchange: the strategy of a run launched as a single rank.

Starting Horovod for a world of one costs throughput and buys nothing: its background thread
wakes every cycle (1 ms by default) to negotiate with no one, and each wake-up preempts a
torch compute thread; with every core busy, the step rate drops by several percent
(benchmarks/README.md, overhead). PyTorch's own DistributedDataParallel is likewise left out
of single-process training. The Trainer cannot tell the difference: collectives over a world
of one are the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from hvdllm import comm
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.grid import rank_coordinates


class SingleProcess(ParallelStrategy):
    def setup(self, threads: int) -> None:
        comm.set_threads(threads, ranks_on_node=1)
        self.coords = rank_coordinates(self.layout, 0)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass  # the only rank is the root

    def finish_gradients(self, optimizer: torch.optim.Optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        return step_stats  # local gradients are the global ones

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def allgather_object(self, obj, name: str) -> list:
        return [obj]
