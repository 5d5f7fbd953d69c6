"""Learning-rate schedules: linear warmup, then a decay shape, times an adaptive plateau factor.

``LRSchedule`` sets every param group's lr before each optimizer step::

    lr(step) = base_lr * warmup_then_decay(step) * plateau_scale

``plateau_scale`` starts at 1 and is multiplied by ``plateau_factor`` whenever the
validation loss has not improved for ``plateau_patience`` evaluations, as torch's
``ReduceLROnPlateau`` does, but composed with the step schedule instead of replacing it.
"""

from __future__ import annotations

import math
from bisect import bisect_right

import torch

from hvdllm.choices import SCALE_RULES, SCHEDULES
from hvdllm.optim.plateau import BestTracker


def scaled_lr(base_lr: float, ranks: int, rule: str) -> float:
    """Scale a single-rank lr to ``ranks`` data-parallel ranks: none, linear (Goyal et al.
    2017) or sqrt (Krizhevsky 2014; the rule LAMB's paper uses)."""
    if rule == "linear":
        return base_lr * ranks
    if rule == "sqrt":
        return base_lr * math.sqrt(ranks)
    if rule != "none":
        raise ValueError(f"schedule.scale_rule must be one of {', '.join(SCALE_RULES)}; got {rule!r}")
    return base_lr


def lr_factor(step: int, total_steps: int, cfg) -> float:
    """Multiplier of the peak lr for the update with 0-based index ``step``.

    Args:
        cfg: a ``ScheduleConfig`` (name, warmup_steps, min_lr_ratio, milestones, gamma,
            decay_fraction).
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    if cfg.name == "step":
        return cfg.gamma ** bisect_right(cfg.milestones, step)
    if cfg.name == "wsd":  # warmup, stable at the peak, then a linear decay over the last part
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * (1 - min(1.0, (step - decay_start) / decay_steps))
    if cfg.name != "constant":
        raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULES)}; got {cfg.name!r}")
    return 1.0


class LRSchedule:
    """Drives the optimizer's lr; checkpointable through state_dict / load_state_dict."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, cfg) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.cfg = cfg
        self.plateau_scale = 1.0
        self.val_loss = BestTracker()

    def lr_at(self, step: int) -> float:
        return self.base_lr * lr_factor(step, self.total_steps, self.cfg) * self.plateau_scale

    def apply(self, step: int) -> float:
        """Set the lr for update ``step`` on every param group; returns it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe_val_loss(self, val_loss: float) -> bool:
        """Feed one evaluation; returns True when it reduced the lr."""
        if self.val_loss.observe(val_loss):
            return False
        if self.cfg.plateau and self.val_loss.since_best >= self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.val_loss.since_best = 0  # wait another patience before the next reduction
            return True
        return False

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps,
                "plateau_scale": self.plateau_scale, "val_loss": self.val_loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        # Checkpoints from before BestTracker kept the record as two numbers.
        self.val_loss.load_state_dict(state["val_loss"] if "val_loss" in state else
                                      {"best": state["best_val"], "since_best": state["bad_evals"]})
