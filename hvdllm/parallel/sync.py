"""Synchronous data parallelism with Horovod: ring-allreduce of gradients every step.

- ``hvd.DistributedOptimizer`` with ``named_parameters`` starts each gradient's allreduce
  from a backward hook as soon as it is ready, overlapping communication with the rest of
  backward; ``backward_passes_per_step`` accumulates k micro-batches locally and reduces once.
- Clipping needs the reduced gradients, so the loop calls :meth:`finish_gradients`
  (``synchronize()``; the step's loss and flags are reduced in the same cycle), clips (and
  unscales fp16 gradients), then :meth:`apply_update` steps under ``skip_synchronize()`` so
  the allreduce is not issued twice.
- ``op = "adasum"`` is another strategy (:mod:`hvdllm.parallel.adasum`): it combines
  updates, not gradients.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hvdllm import comm
from hvdllm.parallel.base import ParallelStrategy, step_optimizer
from hvdllm.parallel.grid import rank_coordinates


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


class HorovodSync(ParallelStrategy):
    """Replicas of the model on every rank; gradients averaged by a ring allreduce."""

    needs_mpi = False  # whether the groups need mpi4py communicators (point to point)

    def named_groups(self) -> dict:
        """The groups this strategy communicates in, for every rank: one data group per model
        part (its gradient allreduce; the whole world with a single part)."""
        return {("data",): self.layout.groups(("data",))}

    def setup(self, threads: int) -> None:
        apply_horovod_environment(self.run_cfg)  # hvd.init() reads these once
        self.groups = comm.init(self.named_groups(), threads=threads, mpi=self.needs_mpi)
        self.hvd = comm.horovod()
        self.coords = rank_coordinates(self.layout, self.hvd.rank())
        self.data_set = self.groups.group(("data",)).process_set

    def wrap_optimizer(self, optimizer, model: nn.Module):
        hvd = self.hvd
        compression = hvd.Compression.fp16 if self.cfg.compression == "fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=compression, op=hvd.Average,
                                        backward_passes_per_step=self.backward_passes_per_step,
                                        process_set=self.data_set)

    @property
    def backward_passes_per_step(self) -> int:
        """Backward passes over each parameter per optimizer step: Horovod reduces after the last."""
        return self.cfg.accum_steps

    def broadcast_state(self, model: nn.Module, optimizer) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A fresh optimizer has no state on any rank, so there is nothing to send. (Horovod's
        # broadcast_optimizer_state would first create it with a zero-gradient step, which for
        # AdamW applies weight decay and advances the bias-correction step count.)
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        # Enqueued first, so Horovod negotiates the statistics in the same cycle as the last
        # gradients instead of one cycle (HOROVOD_CYCLE_TIME) later.
        stats = self.hvd.allreduce_async(step_stats, op=self.hvd.Sum, name="step_stats")
        optimizer.synchronize()
        return self.hvd.synchronize(stats)

    def apply_update(self, optimizer, scaler) -> None:
        with optimizer.skip_synchronize():  # the allreduce was finished in finish_gradients
            step_optimizer(optimizer, scaler)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def allgather_object(self, obj, name: str) -> list:
        return self.hvd.allgather_object(obj, name=name)
