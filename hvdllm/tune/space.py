"""The search space of ``hvdllm tune``: the ``[tune.space]`` table parsed into dimensions and
checked against the config fields they name, before any trial runs.

    [tune.space]
    "optim.lr" = { log = [1e-4, 1e-2] }            # log-uniform between the bounds
    "model.dropout" = { uniform = [0.0, 0.2] }     # uniform (a `step` makes it discrete)
    "schedule.warmup_steps" = { int = [0, 50], step = 10 }
    "optim.weight_decay" = [0.0, 0.01, 0.1]        # one of these choices

An integer field takes ``int`` or ``log`` (then the log-uniform draw is an integer), a float
field ``uniform`` or ``log``. Every bound and every choice is a value the field must accept:
the config is built with it, so the same check as ``hvdllm train`` names what is wrong.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from hvdllm.choices import SPACE_DISTRIBUTIONS
from hvdllm.config import ConfigError, load_config
from hvdllm.config.loading import field_annotation

# Set for each trial by the tuner itself, so never searched.
SET_BY_TUNER = ("train.run_dir",)
_EXAMPLE = "a list of choices or a table such as { log = [1e-4, 1e-2] }, { uniform = [0, 1] }, { int = [1, 8] }"


@dataclass(frozen=True)
class Dimension:
    """One searched config field: a range (``log``, ``uniform``, ``int``) or ``choice``s."""

    key: str  # the config field, "section.key"
    kind: str  # "log" | "uniform" | "int" | "choice"
    integer: bool = False  # the field is an int: draws are integers
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    choices: tuple = ()

    def describe(self) -> dict[str, Any]:
        """A JSON-able form, stored with the study to notice a changed space on resume."""
        if self.kind == "choice":
            return {"key": self.key, "choices": list(self.choices)}
        return {"key": self.key, self.kind: [self.low, self.high], "step": self.step}

    def suggest(self, trial) -> Any:
        """Draw this dimension's value for an optuna Trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.kind == "log")
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "log")

    def grid_values(self) -> list:
        """Every value a grid search visits; a ConfigError for a continuous range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "log" or (not self.integer and self.step is None):
            raise ConfigError(f"{_name(self.key)}: tune.sampler = \"grid\" needs choices or a range with a step")
        if self.integer:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        count = int((self.high - self.low) / self.step + 1e-9) + 1  # the high bound counts when a step reaches it
        # Rounded: 0.1 * 3 is 0.30000000000000004, past a high bound of 0.3 (a field's limit, maybe).
        return [min(self.high, round(self.low + i * self.step, 12)) for i in range(count)]


def _name(key: str) -> str:
    return f'tune.space["{key}"]'


def override(key: str, value: Any) -> str:
    """``--section.key=value`` as ``hvdllm train`` parses it back to ``value``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"--{key}={text}"


def _number(value: Any, integer: bool, where: str) -> float | int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value if integer else float(value)


def _parse_range(key: str, table: dict[str, Any], integer: bool) -> Dimension:
    name = _name(key)
    kinds = [k for k in table if k in SPACE_DISTRIBUTIONS]
    unknown = [k for k in table if k not in (*SPACE_DISTRIBUTIONS, "step")]
    if unknown or len(kinds) != 1:
        what = f"unknown entry {unknown[0]!r}" if unknown else f"{len(kinds)} of {', '.join(SPACE_DISTRIBUTIONS)}"
        raise ConfigError(f"{name}: {what}; write {_EXAMPLE}")
    kind = kinds[0]
    if kind == "int" and not integer:
        raise ConfigError(f"{name}: {key} is a float field: use {{ uniform = [lo, hi] }} or {{ log = [lo, hi] }}")
    if kind == "uniform" and integer:
        raise ConfigError(f"{name}: {key} is an integer field: use {{ int = [lo, hi] }} or {{ log = [lo, hi] }}")
    bounds = table[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(f"{name}: {kind} must be [low, high], got {bounds!r}")
    low, high = (_number(b, integer, f"{name}: {kind} bound") for b in bounds)
    if not low < high:
        raise ConfigError(f"{name}: the low bound must be below the high one, got [{low}, {high}]")
    if kind == "log" and low <= 0:
        raise ConfigError(f"{name}: a log range needs a low bound > 0, got {low}")
    step = table.get("step")
    if step is not None:
        step = _number(step, integer, f"{name}: step")
        if kind == "log":
            raise ConfigError(f"{name}: a log range takes no step")
        if step <= 0:
            raise ConfigError(f"{name}: step must be > 0, got {step}")
    return Dimension(key, kind, integer, low, high, step)


def _parse_choices(key: str, choices: list, annotation: Any) -> Dimension:
    name = _name(key)
    if not choices:
        raise ConfigError(f"{name}: an empty list of choices")
    for choice in choices:
        if not isinstance(choice, (bool, int, float, str)):
            raise ConfigError(f"{name}: a choice must be a number, a string or true/false, got {choice!r}")
    if annotation is float:  # 0 and 0.0 are one choice for a float field
        choices = [float(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in choices]
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{name}: a choice is listed twice in {choices}")
    return Dimension(key, "choice", annotation is int, choices=tuple(choices))


def parse_dimension(key: str, value: Any) -> Dimension:
    """One ``[tune.space]`` entry; a ConfigError naming it when its key is not a config field
    or its form is not one of those above (the values themselves: :func:`check_values`)."""
    try:
        annotation = field_annotation(key)
    except ConfigError as err:
        raise ConfigError(f"{_name(key)}: {err}") from None
    if key.split(".")[0] == "tune" or key in SET_BY_TUNER:
        raise ConfigError(f"{_name(key)}: {key} is set by the tuner itself, it cannot be searched")
    if typing.get_origin(annotation) is not None:
        raise ConfigError(f"{_name(key)}: {key} is a list field; only single values can be searched")
    if isinstance(value, list):
        return _parse_choices(key, value, annotation)
    if isinstance(value, dict):
        if annotation not in (int, float):
            raise ConfigError(f"{_name(key)}: {key} is not a number, so it takes a list of choices")
        return _parse_range(key, value, annotation is int)
    raise ConfigError(f"{_name(key)}: write {_EXAMPLE}, got {value!r}")


def check_values(dimension: Dimension, config: str | Path | None, overrides: list[str]) -> None:
    """Build the config with each bound or choice of ``dimension``: a value the field refuses
    is a ConfigError naming the entry and the value, as ``hvdllm train`` would word it."""
    values = dimension.choices if dimension.kind == "choice" else (dimension.low, dimension.high)
    for value in values:
        try:
            load_config(config, [*overrides, override(dimension.key, value)])
        except ConfigError as err:
            raise ConfigError(f"{_name(dimension.key)}: {value!r} is not a valid value: {err}") from None


def _model_values(dimension: Dimension) -> list:
    """The values of a searched model field that can break a rule tying it to another field:
    every choice, every integer of a range; a float range's bounds (no such rule reads a float)."""
    if dimension.kind == "choice":
        return list(dimension.choices)
    if dimension.integer:
        return list(range(int(dimension.low), int(dimension.high) + 1, int(dimension.step or 1)))
    return [dimension.low, dimension.high]


def check_model_combinations(dimensions: list[Dimension], config: str | Path | None, overrides: list[str]) -> None:
    """Build the model of every combination of the searched ``model.*`` fields: the rules tying
    fields together (d_model divisible by n_head, an even head dimension for rope) are checked
    only when a model is built, so a trial would otherwise be the first to meet them."""
    searched = [d for d in dimensions if d.key.startswith("model.")]
    if not searched:
        return
    from hvdllm.model import gpt_config_from  # imports torch: only for a space that searches the model

    model = load_config(config, overrides).model
    for values in product(*(_model_values(d) for d in searched)):
        fields = {d.key.split(".", 1)[1]: value for d, value in zip(searched, values)}
        try:
            gpt_config_from(dataclasses.replace(model, **fields))
        except ValueError as err:
            shown = ", ".join(f"{d.key}={value!r}" for d, value in zip(searched, values))
            raise ConfigError(f"tune.space: {shown} makes no valid model with this config: {err}") from None


def parse_space(space: dict[str, Any], config: str | Path | None, overrides: list[str]) -> list[Dimension]:
    """Every dimension of ``space`` (tune.space), each checked against the config at
    ``config`` with ``overrides``, and every combination of the model fields it searches. A
    key also given as an override is refused: the trial's value would silently replace it."""
    if not space:
        raise ConfigError("tune.space is empty: add a [tune.space] table, e.g. \"optim.lr\" = { log = [1e-4, 1e-2] }")
    given = {text.lstrip("-").split("=", 1)[0] for text in overrides}
    dimensions = []
    for key, value in space.items():
        dimension = parse_dimension(key, value)
        if key in given:
            raise ConfigError(f"--{key} is given on the command line but {key} is in tune.space: drop one of them")
        check_values(dimension, config, overrides)
        dimensions.append(dimension)
    check_model_combinations(dimensions, config, overrides)
    return dimensions
