"""Optimizers (AdamW, LAMB, Adafactor), parameter groups and learning-rate schedules."""

from hvdllm.optim.adafactor import Adafactor
from hvdllm.optim.build import build_optimizer, param_groups
from hvdllm.optim.lamb import Lamb
from hvdllm.optim.schedule import LRSchedule, lr_factor, scaled_lr

__all__ = ["Adafactor", "LRSchedule", "Lamb", "build_optimizer", "lr_factor", "param_groups", "scaled_lr"]
