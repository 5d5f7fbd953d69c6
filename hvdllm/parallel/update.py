"""Update rules: how the replicas of a model part (its data group) agree on an update.

A rule is one part of a Horovod strategy (sync.py), apart from how the model is cut into parts
(a whole model, pipeline stages): so each rule runs with a pipeline too, each stage's data group
agreeing on that stage's update. The rules:

- :class:`AllreduceUpdate` (``parallel.strategy = sync``): gradients averaged by Horovod's ring
  allreduce in backward hooks;
- ``AdasumUpdate`` (``parallel.op = adasum``, adasum.py): each replica steps, Horovod combines
  the updates;
- ``LocalSGDUpdate`` (``parallel.strategy = local-sgd``, local_sgd.py): each replica steps on its
  own for H steps, then the deltas are averaged with an outer optimizer.

The parameter server (param_server.py) is a strategy of its own: its updates happen on other
ranks, not among replicas.
"""

from __future__ import annotations

import torch
from torch import nn

from hvdllm.comm.groups import Group


def step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``, through the loss scaler when there is one (it skips the step when
    the unscaled gradients hold an inf or NaN)."""
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


class UpdateRule:
    """The default of every hook: nothing exchanged, the optimizer stepped as it is."""

    # Whether the replicas hold different parameters between exchanges (each writes its own
    # checkpoint shard and none is broadcast over the others on resume).
    replicas_differ = False
    # Whether each replica holds the optimizer state of only some parameters (ZeRO), so that a
    # checkpoint gathers it from every replica (a collective) and no replica broadcasts its own.
    gathers_optimizer_state = False
    # Whether each replica holds only some parameters' gradients after the exchange (ZeRO-2).
    shards_gradients = False

    def __init__(self, parallel_cfg, hvd, data_group: Group, backward_passes_per_step: int) -> None:
        self.cfg, self.hvd, self.data_group = parallel_cfg, hvd, data_group
        self.backward_passes_per_step = backward_passes_per_step

    def check_runtime(self) -> None:
        """After the runtime started: refuse, with one line, a launch this rule cannot run on."""

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def after_broadcast(self) -> None:
        """The replicas were just made equal (a fresh run): a rule's own copies follow."""

    @property
    def needs_broadcast(self) -> bool:
        return True

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective in the data group, after the last backward of a step."""

    def sum_squares(self, squares: float) -> float:
        """Collective where the replicas hold different gradients: the sum of the squares of
        this model part's gradients over the data group, from this replica's sum."""
        return squares

    def agree_norm(self, norm: float) -> float:
        """Collective where a rule needs one: the norm every replica decides the step on."""
        return norm

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        step_optimizer(optimizer, scaler)

    def after_update(self) -> None:
        """After every step, skipped ones too (so that periodic exchanges stay aligned)."""

    def step_metrics(self) -> dict:
        return {}

    def banner_notes(self) -> list[str]:
        """Lines for the run's banner about what this rule keeps where."""
        return []

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state a checkpoint holds (a collective where it is gathered)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def state_dict(self) -> dict | None:
        """The rule's own state for a checkpoint (None: it has none)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class AllreduceUpdate(UpdateRule):
    """Synchronous data parallelism: ``hvd.DistributedOptimizer`` (with ``named_parameters``)
    starts each gradient's allreduce in the data group from a backward hook as soon as it is
    ready, overlapping communication with the rest of backward; ``backward_passes_per_step``
    accumulates locally and reduces once. Clipping needs the reduced gradients, so
    :meth:`reduce_gradients` waits for them (``synchronize()``) and :meth:`step` steps under
    ``skip_synchronize()`` so the allreduce is not issued twice. A data group of one replica
    has nothing to reduce."""

    def wrap_optimizer(self, optimizer, model: nn.Module):
        self.wrapped = self.data_group.size > 1
        if not self.wrapped:
            return optimizer
        hvd = self.hvd
        compression = hvd.Compression.fp16 if self.cfg.compression == "fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        compression=compression, op=hvd.Average,
                                        backward_passes_per_step=self.backward_passes_per_step,
                                        process_set=self.data_group.process_set)

    def reduce_gradients(self, optimizer) -> None:
        if self.wrapped:
            optimizer.synchronize()

    def step(self, optimizer, scaler) -> None:
        if not self.wrapped:
            step_optimizer(optimizer, scaler)
            return
        with optimizer.skip_synchronize():  # the allreduce was finished in reduce_gradients
            step_optimizer(optimizer, scaler)
