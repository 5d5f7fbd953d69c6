"""What a resume changes: each setting that differs from the checkpoint's config, one line
each, and what that does to the lr curve. A resumed run with another ``train.steps``
recomputes its schedule, so the lr can jump; a user should read that, not find it in a plot."""

from __future__ import annotations

import tomllib

from hvdllm.config import Config, config_from_dict, config_to_toml
from hvdllm.optim.schedule import lr_factor
from hvdllm.train.phases import Phase, plan_phases

# Settings that differ on every resume by design.
EXPECTED_TO_DIFFER = ("checkpoint.resume",)
# Settings whose change redraws the lr curve.
SCHEDULE_KEYS = ("train.steps", "optim.lr", "phases")


def changed_settings(saved_toml: str, current_toml: str) -> list[tuple[str, object, object]]:
    """(key, the checkpoint's value, this run's) for each setting that differs, in key order;
    ``phases`` is compared whole."""
    before, now = _flat(tomllib.loads(saved_toml)), _flat(tomllib.loads(current_toml))
    keys = sorted((before.keys() | now.keys()) - set(EXPECTED_TO_DIFFER))
    return [(key, before.get(key), now.get(key)) for key in keys if before.get(key) != now.get(key)]


def resume_lines(saved_toml: str, cfg: Config, step: int, plan: list[Phase], plateau_scale: float,
                 data_ranks: int, shard_seq_len: int, block_size: int) -> list[str]:
    """The lines a resume at ``step`` prints about changed settings (none when nothing
    changed); ``plan`` is this run's phases, ``plateau_scale`` the checkpoint's."""
    changes = changed_settings(saved_toml, config_to_toml(cfg))
    lines = [f"resume: {key} {_shown(old)} -> {_shown(new)} (checkpoint -> now)" for key, old, new in changes]
    if any(key.startswith("schedule.") or key in SCHEDULE_KEYS for key, _, _ in changes) and step < plan[-1].end_step:
        old_plan = plan_phases(config_from_dict(tomllib.loads(saved_toml)), data_ranks, shard_seq_len, block_size)
        old_lr = _lr(old_plan, step) * plateau_scale if step < old_plan[-1].end_step else None
        new_lr, last = _lr(plan, step) * plateau_scale, plan[-1]
        end_lr = _lr(plan, last.end_step - 1) * plateau_scale
        was = f"was {old_lr:.2e} under the checkpoint's settings, " if old_lr is not None else ""
        lines.append(f"resume: the lr schedule follows the new settings: lr at step {step + 1} {was}is "
                     f"{new_lr:.2e} now, then {last.schedule.name} to {end_lr:.2e} at step {last.end_step}")
    return lines


def _lr(plan: list[Phase], step: int) -> float:
    """The lr of update ``step`` (0-based) under ``plan``, before any plateau scaling."""
    phase = next(p for p in plan if step < p.end_step)
    return phase.lr * lr_factor(step - phase.start_step, phase.steps, phase.schedule)


def _flat(table: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: object) -> str:
    return "(unset)" if value is None else repr(value) if isinstance(value, str) else str(value)
