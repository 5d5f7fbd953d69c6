"""The seam between the training loop and how updates travel between ranks.

A strategy owns: which data slice this rank reads, how the optimizer is wrapped, how state
is made equal across ranks at start and after resume, and how one optimizer step turns
local gradients into an update. The Trainer calls only this interface, so a ring allreduce
(``HorovodSync``), an asynchronous parameter server or a pipeline stage can stand behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class UpdateStrategy(ABC):
    @property
    @abstractmethod
    def data_rank(self) -> tuple[int, int]:
        """(rank, size) of this process in the data-parallel group: the loader's slice."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """Processes taking part in training."""

    @abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer the loop steps (e.g. a Horovod DistributedOptimizer around it)."""

    @abstractmethod
    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every rank's parameters and optimizer state equal to rank 0's."""

    @abstractmethod
    def finish_gradients(self, optimizer: torch.optim.Optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        """Complete the gradient exchange of this step (after the last backward) and return
        ``step_stats`` (loss, flags) summed over all ranks. The two travel in the same round,
        so a step waits for the network once, not twice."""

    @abstractmethod
    def apply_update(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        """Step the optimizer on the finished gradients."""

    @abstractmethod
    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Sum a small tensor of metrics over all ranks (same name, same order everywhere)."""

    @abstractmethod
    def allgather_object(self, obj, name: str) -> list:
        """One Python object from every rank, in rank order."""


def step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``, through the loss scaler when there is one (it skips the step when
    the unscaled gradients hold an inf or NaN)."""
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()
