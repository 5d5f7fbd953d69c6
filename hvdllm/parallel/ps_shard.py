"""A parameter server's shard: its range of the model's parameters as master weights, the
optimizer state of those parameters, and the two update rules (one step on a clock's mean
gradient for s = 0, one step per push for s > 0). No MPI: the sum over servers that the
global norm needs is a function given to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hvdllm.optim import LRSchedule, build_optimizer
from hvdllm.parallel.grid import Grid
from hvdllm.parallel.ps_protocol import shard_ranges


@dataclass
class ServerSetup:
    """What a server needs from the layers above the parallel one (built by
    hvdllm.train.server_setup, so that this layer imports nothing of train)."""

    model: nn.Module  # the whole initial model, as every worker builds it (seeded, warm-started)
    lr: float  # the run's peak lr (one phase: async refuses [[phases]])
    steps: int  # the schedule's length
    schedule: object  # a ScheduleConfig
    batch_size: int  # samples per worker per clock (load_balance splits workers x this)
    resumed: dict | None  # this server's shard of the checkpoint resumed from, or None
    save: Callable[[int, dict], None]  # write this server's shard of step N
    end_job: Callable[[str], None]  # record the error line as the run's status, end every rank; never returns


# How build_strategy is told to make server k's setup: (the run's Config, layout, k) -> ServerSetup.
ServerSetupFactory = Callable[[object, Grid, int], ServerSetup]


class ServerShard:
    """Server ``index`` of ``servers``: its parameters as views of one flat float32 buffer
    (the optimizer updates them in place, and a reply is that buffer's bytes); the rest of
    the model is freed."""

    def __init__(self, setup: ServerSetup, optim_cfg, index: int, servers: int,
                 sum_over_servers: Callable[[float], float]) -> None:
        self.sum_over_servers, self.grad_clip = sum_over_servers, optim_cfg.grad_clip
        params = [p for p in setup.model.parameters() if p.requires_grad]
        start, end = shard_ranges([p.numel() for p in params], servers)[index]
        mine = params[start:end]
        n = sum(p.numel() for p in mine)
        self.weights = torch.zeros(n, dtype=torch.float32)  # the master weights, sent as they are
        self.grad = torch.zeros(n, dtype=torch.float32)
        self.accumulated = torch.zeros(n, dtype=torch.float64)  # s = 0: the open clock's gradient sum
        offset = 0
        with torch.no_grad():
            for param in mine:
                view = self.weights[offset:offset + param.numel()].view_as(param)
                view.copy_(param)
                param.data, param.grad = view, self.grad[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
        self.optimizer = build_optimizer(setup.model, optim_cfg, setup.lr)
        ids = {id(p) for p in mine}
        for group in self.optimizer.param_groups:  # same groups (decay or not) as a replica's
            group["params"] = [p for p in group["params"] if id(p) in ids]
        for param in params:
            if id(param) not in ids:
                param.data = torch.empty(0)  # the server keeps its shard only
        self.schedule = LRSchedule(self.optimizer, setup.lr, setup.steps, setup.schedule)

    def accumulate(self, gradient: torch.Tensor) -> None:
        """s = 0: add a push (already weighted by its worker) to the open clock's sum."""
        self.accumulated += gradient

    def take_mean(self, weight: float) -> float:
        """s = 0: the open clock's sum over ``weight`` becomes the gradient, the sum restarts;
        returns the global norm of the mean (collective: every server calls this once per
        clock, in clock order)."""
        mean = (self.accumulated / weight).float()
        self.accumulated.zero_()
        self.grad.copy_(mean)
        square = self.sum_over_servers(mean.double().square().sum().item())
        return math.sqrt(square) if math.isfinite(square) else math.inf

    def step_on_mean(self, clock: int, norm: float) -> None:
        """s = 0: one optimizer step on the mean from :meth:`take_mean`, clipped by its global
        ``norm`` as ``sync`` clips, at the schedule's lr for ``clock``."""
        coefficient = (self.grad_clip or math.inf) / (norm + 1e-6)
        if coefficient < 1.0:
            self.grad.mul_(coefficient)
        self.schedule.apply(clock)
        self.optimizer.step()

    def step_on_push(self, gradient: torch.Tensor, lr: float) -> None:
        """s > 0: one optimizer step on one push at ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.grad.copy_(gradient)
        self.optimizer.step()

    def lr_at(self, version: int) -> float:
        return self.schedule.lr_at(version)

    def state_dict(self) -> dict:
        return {"model": {"flat": self.weights.clone()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.weights.copy_(state["model"]["flat"])
        self.optimizer.load_state_dict(state["optimizer"])
