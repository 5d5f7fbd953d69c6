"""Data parallelism over Horovod: replicas of the model (or of each pipeline stage, pipeline.py)
in data groups, agreeing on updates by an update rule (update.py): a gradient allreduce,
Adasum or local SGD. The step's statistics travel in the same Horovod cycle as the gradients.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch import nn

from hvdllm import comm
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.gradients import clip_to_norm, squares
from hvdllm.parallel.grid import rank_coordinates
from hvdllm.parallel.update import UpdateRule


def horovod_environment(parallel_cfg, train_cfg=None) -> dict[str, str]:
    """Horovod knobs from the config, as the variables ``hvd.init`` reads; -1 leaves a knob
    to Horovod (its default, or what the user's environment already says). With
    ``train_cfg``, Horovod's stall check follows ``train.stall_timeout_s``: the coordinator
    names the missing ranks after half of it, and Horovod shuts down after twice it, a
    backstop behind the training loop's own watchdog (hvdllm/train/watchdog.py)."""
    env = {}
    stall_s = train_cfg.stall_timeout_s if train_cfg is not None else 0
    if stall_s > 0:
        env["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(max(1, int(stall_s / 2)))
        env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(max(2, int(stall_s * 2)))
    if parallel_cfg.fusion_threshold_mb >= 0:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(parallel_cfg.fusion_threshold_mb * 1024 * 1024))
    if parallel_cfg.cycle_time_ms >= 0:
        env["HOROVOD_CYCLE_TIME"] = str(parallel_cfg.cycle_time_ms)
    if parallel_cfg.hierarchical_allreduce:
        env["HOROVOD_HIERARCHICAL_ALLREDUCE"] = "1"
    if parallel_cfg.timeline:
        env["HOROVOD_TIMELINE"] = parallel_cfg.timeline
    if parallel_cfg.mpi_yield_when_idle:
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    return env


def apply_horovod_environment(cfg) -> None:
    """Set the knobs of a whole Config (``[parallel]``, and ``[train]``'s stall timeout) before
    ``hvd.init()``, which reads them once (and initializes MPI, which reads its OMPI_MCA_*
    variables then)."""
    os.environ.update(horovod_environment(cfg.parallel, cfg.train))


RuleFactory = Callable[..., UpdateRule]


class HorovodDataParallel(ParallelStrategy):
    """Replicas of the model in one data group (the world), updated by ``rule``."""

    needs_mpi = False  # whether the groups need mpi4py communicators (point to point)

    def __init__(self, cfg, layout, rule: RuleFactory) -> None:
        super().__init__(cfg, layout)
        self.make_rule = rule

    def named_groups(self) -> dict:
        """The groups this strategy communicates in, for every rank: one data group per model
        part (its gradient allreduce; the whole world with a single part)."""
        return {("data",): self.layout.groups(("data",))}

    def setup(self, threads: int) -> None:
        apply_horovod_environment(self.run_cfg)  # hvd.init() reads these once
        self.groups = comm.init(self.named_groups(), threads=threads, mpi=self.needs_mpi)
        self.hvd = comm.horovod()
        self.coords = rank_coordinates(self.layout, self.hvd.rank())
        self.update_rule = self.make_rule(self.cfg, self.hvd, self.groups.group(("data",)),
                                          self.backward_passes_per_step)
        self.update_rule.check_runtime()

    @property
    def backward_passes_per_step(self) -> int:
        """Backward passes over each parameter per optimizer step: Horovod reduces after the last."""
        return self.cfg.accum_steps

    @property
    def writes_checkpoint(self) -> bool:
        return self.update_rule.replicas_differ or super().writes_checkpoint

    @property
    def checkpoint_shard(self) -> int:
        # Replicas that differ write a shard each, by rank: ranks 0 .. p - 1 are the first
        # replica's pipeline stages, so they still consolidate as stages 0 .. p - 1.
        return self.coords.rank if self.update_rule.replicas_differ else super().checkpoint_shard

    def wrap_optimizer(self, optimizer, model: nn.Module):
        return self.update_rule.wrap_optimizer(optimizer, model)

    def broadcast_state(self, model: nn.Module, optimizer) -> None:
        if not self.update_rule.needs_broadcast:
            return
        self.broadcast_replica(model, optimizer)
        self.update_rule.after_broadcast()

    def broadcast_replica(self, model: nn.Module, optimizer) -> None:
        """Collective: rank 0's parameters (and optimizer state, if any) on every replica."""
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A fresh optimizer has no state on any rank, so there is nothing to send. (Horovod's
        # broadcast_optimizer_state would first create it with a zero-gradient step, which for
        # AdamW applies weight decay and advances the bias-correction step count.) Under ZeRO
        # each rank holds its own share, read from the same checkpoint.
        if optimizer.state_dict()["state"] and not self.update_rule.gathers_optimizer_state:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        # Enqueued first, so Horovod negotiates the statistics in the same cycle as the last
        # gradients instead of one cycle (HOROVOD_CYCLE_TIME) later.
        stats = self.hvd.allreduce_async(step_stats, op=self.hvd.Sum, name="step_stats")
        self.update_rule.reduce_gradients(optimizer)
        self.after_gradients()
        return self.hvd.synchronize(stats)

    def after_gradients(self) -> None:
        """Once the data group's gradients are complete (a pipeline sums its tied copies here)."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        if self.update_rule.shards_gradients:  # each replica holds its own share of the gradients
            grads = [p for p in model.parameters() if p.grad is not None]
            norm = math.sqrt(self.update_rule.sum_squares(squares(grads)))
            return clip_to_norm([p.grad for p in grads], norm, max_norm)
        return self.update_rule.agree_norm(super().clip_grad_norm_(model, max_norm))

    def apply_update(self, optimizer, scaler) -> None:
        self.update_rule.step(optimizer, scaler)

    def update(self, optimizer, model: nn.Module, precision, max_norm: float, nonfinite: bool) -> tuple[float, bool]:
        if precision.scaler is not None and self.update_rule.shards_gradients and not nonfinite:
            result = self.scaled_update_on_the_global_norm(optimizer, model, precision.scaler, max_norm)
        else:
            result = super().update(optimizer, model, precision, max_norm, nonfinite)
        self.update_rule.after_update()
        return result

    def step_metrics(self) -> dict:
        return self.update_rule.step_metrics()

    @property
    def gathers_checkpoint_state(self) -> bool:
        return self.update_rule.gathers_optimizer_state

    def optimizer_state(self, optimizer) -> dict:
        return self.update_rule.full_optimizer_state(optimizer)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        self.update_rule.load_optimizer_state(optimizer, state)

    def banner_notes(self) -> list[str]:
        return self.update_rule.banner_notes()

    def state_dict(self, model: nn.Module, optimizer) -> dict:
        state = super().state_dict(model, optimizer)
        rule_state = self.update_rule.state_dict()
        if rule_state is not None:
            state["update_rule"] = rule_state
        if self.update_rule.replicas_differ:
            state["layout"]["replicas_differ"] = True  # every rank wrote its own file (checkpoint_shard)
        return state

    def checkpoint_layout_problem(self, saved: dict) -> str:
        """Replicas that differ were saved one file per rank: only as many ranks can resume them."""
        problem = super().checkpoint_layout_problem(saved)
        if problem or not (self.update_rule.replicas_differ and saved.get("replicas_differ")):
            return problem
        replicas = int(saved.get("data", 1))
        if replicas == self.layout.data:
            return ""
        ranks = replicas * int(saved.get("pipeline", 1)) * int(saved.get("tensor", 1))
        return (f"the checkpoint holds {replicas} replicas of parallel.strategy={self.cfg.strategy}, one file per "
                f"rank: {ranks} ranks saved it, {self.layout.workers} launched; resume it on {ranks} ranks")

    def load_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        super().load_state_dict(model, optimizer, state)
        if self.update_rule.replicas_differ or "update_rule" in state:
            self.update_rule.load_state_dict(state.get("update_rule", state.get("local_sgd")))

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def allgather_object(self, obj, name: str) -> list:
        return self.hvd.allgather_object(obj, name=name)
