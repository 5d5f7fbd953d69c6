"""A run in phases (e.g. short sequences first), each with its own batch size, sequence
length, learning rate and schedule; one phase when no ``[[phases]]`` are given. ("Stage"
means a pipeline stage only.) docs/design/training-loop.md says how phases resume."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from hvdllm.config import Config
from hvdllm.data import DistributedBatches
from hvdllm.errors import UserError
from hvdllm.optim import LRSchedule, scaled_lr


@dataclass
class Phase:
    index: int
    start_step: int  # global step at which the phase begins
    steps: int
    batch_size: int  # samples per data-parallel rank per accumulation batch
    seq_len: int
    lr: float  # peak lr, already scaled for the data-parallel degree
    schedule: object  # a ScheduleConfig

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


def plan_phases(cfg: Config, data_ranks: int, shard_seq_len: int, block_size: int) -> list[Phase]:
    """The run as phases, checked against the data and the model. ``data_ranks`` is the
    data-parallel degree: batch sizes and lr scaling count replicas, not ranks. Raises
    UserError naming the setting at fault."""
    accum = cfg.parallel.accum_steps
    batch = cfg.data.batch_size
    if cfg.data.global_batch_size:
        per_step = data_ranks * accum
        if cfg.data.global_batch_size % per_step:
            raise UserError(f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by "
                            f"{data_ranks} data-parallel ranks x parallel.accum_steps {accum}")
        batch = cfg.data.global_batch_size // per_step
    base_lr = scaled_lr(cfg.optim.lr, data_ranks, cfg.schedule.scale_rule)
    specs = cfg.phases or [None]
    phases, start = [], 0
    for index, spec in enumerate(specs):
        seq_len = (spec.seq_len if spec and spec.seq_len else 0) or cfg.data.seq_len or shard_seq_len
        where = f"phases[{index}].seq_len" if spec and spec.seq_len else "data.seq_len"
        if seq_len > block_size:
            raise UserError(f"{where} {seq_len} is above the model's context (model.block_size {block_size})")
        if seq_len > shard_seq_len:
            raise UserError(f"{where} {seq_len} is longer than the shards' seq_len {shard_seq_len}")
        schedule = cfg.schedule
        if spec and spec.schedule:
            schedule = replace(schedule, name=spec.schedule)
        if spec and spec.warmup_steps >= 0:
            schedule = replace(schedule, warmup_steps=spec.warmup_steps)
        steps = spec.steps if spec else cfg.train.steps
        lr = scaled_lr(spec.lr, data_ranks, cfg.schedule.scale_rule) if spec and spec.lr else base_lr
        phases.append(Phase(index, start, steps, (spec.batch_size if spec and spec.batch_size else batch),
                            seq_len, lr, schedule))
        start += steps
    return phases


class Phases:
    """The run's phases, the one it is in, and that phase's data loader and LR schedule: a
    stateful part of a checkpoint (its phase, data position and schedule)."""

    def __init__(self, plan: list[Phase], open_loader: Callable[[Phase], DistributedBatches],
                 optimizer: torch.optim.Optimizer) -> None:
        self.plan = plan
        self.open_loader, self.optimizer = open_loader, optimizer
        self.current: Phase | None = None
        self.loader: DistributedBatches | None = None
        self.schedule: LRSchedule | None = None
        self.batches: Iterator | None = None
        self.saved: dict | None = None  # a checkpoint's position, taken up on entering its phase

    @property
    def total_steps(self) -> int:
        return self.plan[-1].end_step

    def at(self, step: int) -> Phase:
        return next(p for p in self.plan if step < p.end_step)

    def advance_to(self, step: int) -> None:
        """Make the phase of ``step`` the current one: entered where a loaded checkpoint left
        it when that is the same phase, else at its start."""
        phase = self.at(step)
        if phase is self.current:
            return
        self.close()
        saved, self.saved = self.saved, None
        self.current = phase
        self.loader = self.open_loader(phase)
        self.schedule = LRSchedule(self.optimizer, phase.lr, phase.steps, phase.schedule)
        if saved is not None and saved["index"] == phase.index:
            self.loader.load_state_dict(map_data_position(saved["data"], self.loader.global_batch))
            self.schedule.load_state_dict(saved["schedule"])
        self.batches = iter(self.loader)

    def replan(self, plan: list[Phase]) -> None:
        """Phases for a new world (Horovod elastic); the next :meth:`advance_to` enters one."""
        self.close()
        self.plan, self.current, self.loader, self.batches = plan, None, None, None

    def state_dict(self) -> dict:
        return {"index": self.current.index, "schedule": self.schedule.state_dict(),
                "data": {**self.loader.state_dict(), "global_batch": self.loader.global_batch}}

    def load_state_dict(self, state: dict) -> None:
        """Keep the position; the caller's :meth:`advance_to` (the resumed step) enters it."""
        self.close()
        self.saved, self.current, self.loader, self.batches = state, None, None, None

    def close(self) -> None:
        """Stop the loader's reader thread."""
        if self.loader is not None:
            self.loader.close()


def map_data_position(data_state: dict, global_batch: int) -> dict:
    """The loader state ``data_state`` (epoch, batch in units of its global batch) in units
    of ``global_batch`` samples, e.g. after a change in the number of data-parallel ranks:
    the same sample of the same epoch comes next. Raises UserError when no whole batch
    starts there."""
    old_global = int(data_state.get("global_batch", global_batch))  # older checkpoints: assume unchanged
    sample = int(data_state["batch"]) * old_global  # position in the epoch's permutation
    if sample % global_batch:
        raise UserError(f"cannot resume the data exactly: the checkpoint stopped at sample {sample} of epoch "
                        f"{data_state['epoch']} (global batch {old_global}), which is not a multiple of this "
                        f"run's global batch {global_batch} (data-parallel ranks x data.batch_size)")
    return {"epoch": int(data_state["epoch"]), "batch": sample // global_batch}
