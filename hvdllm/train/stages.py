"""A run as stages (seed 7.3: e.g. short sequences first), each with its own batch size,
sequence length, learning rate and schedule; one stage when no ``[[stages]]`` are given."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hvdllm.config import Config
from hvdllm.errors import UserError
from hvdllm.optim import scaled_lr


@dataclass
class Stage:
    index: int
    start_step: int  # global step at which the stage begins
    steps: int
    batch_size: int  # samples per data-parallel rank per micro-batch
    seq_len: int
    lr: float  # peak lr, already scaled for the data-parallel degree
    schedule: object  # a ScheduleConfig


def plan_stages(cfg: Config, data_ranks: int, shard_seq_len: int, block_size: int) -> list[Stage]:
    """The run as stages, checked against the data and the model. ``data_ranks`` is the
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
    specs = cfg.stages or [None]
    stages, start = [], 0
    for index, spec in enumerate(specs):
        seq_len = (spec.seq_len if spec and spec.seq_len else 0) or cfg.data.seq_len or shard_seq_len
        where = f"stages[{index}].seq_len" if spec and spec.seq_len else "data.seq_len"
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
        stages.append(Stage(index, start, steps, (spec.batch_size if spec and spec.batch_size else batch),
                            seq_len, lr, schedule))
        start += steps
    return stages
