"""Configs from TOML files and ``--section.key=value`` overrides, and back to TOML.

Precedence is CLI > TOML > defaults. A config file looks like::

    [model]
    preset = "gpt-mini"
    [optim]
    name = "lamb"
    lr = 2e-3
    [[phases]]            # optional: a run in phases, e.g. short sequences first
    steps = 100
    seq_len = 128

and any field can be overridden with ``--section.key=value`` (the value is parsed as a TOML
value when it is one, e.g. ``--optim.betas=[0.9,0.95]``, else taken as a string).
Every mistake raises :class:`ConfigError` with one line that names the key or field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

from hvdllm.config.sections import Config, ConfigError, PhaseConfig, _require
from hvdllm.errors import UserError
from hvdllm.paths import require_file

_SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "phases"
}
# The key of multi-phase runs before "stage" came to mean a pipeline stage only; still read.
_OLD_PHASES_KEY = "stages"


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(sorted(choices))})"


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``kind``; ints widen to float, nothing else converts."""
    origin = typing.get_origin(kind)
    if origin is dict:  # a free-form table (tune.space), checked by the code that reads it
        _require(isinstance(value, dict), name, f"must be a table, got {value!r}")
        return dict(value)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        _require(isinstance(value, list), name, f"must be a list, got {value!r}")
        return [_coerce(item, item_kind, f"{name}[{i}]") for i, item in enumerate(value)]
    if kind is bool:
        _require(isinstance(value, bool), name, f"must be true or false, got {value!r}")
        return value
    if kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        return value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, name, f"must be a number, got {value!r}")
        return float(value)
    _require(isinstance(value, str), name, f"must be a string, got {value!r}")
    return value


# Sections and keys of older configs: a clear pointer to what replaced them, not "unknown".
_REPLACED = {
    "[bench]": "the flags of `hvdllm bench NAME`, each benchmark's own (see `hvdllm bench NAME --help`)",
    "parallel.data_parallel": "parallel.data (data-parallel degree; the layout is data x pipeline + servers)",
}


def _refuse_replaced(name: str, where: str = "") -> None:
    if name in _REPLACED:
        raise ConfigError(f"{where}{name} was replaced by {_REPLACED[name]}")


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        _refuse_replaced(f"{section}.{key}")
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}{_closest(key, list(hints))}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a validation message from __post_init__
        raise ConfigError(str(err)) from None


def field_annotation(path: str) -> Any:
    """The type annotation of the config field ``section.key``; a ConfigError naming it
    (and the closest valid name) when there is no such field."""
    _require(path.count(".") == 1, repr(path), "must name section.key, e.g. optim.lr")
    section, key = path.split(".")
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section [{section}] in {path!r}{_closest(section, list(_SECTIONS))}")
    hints = typing.get_type_hints(_SECTIONS[section])
    if key not in hints:
        raise ConfigError(f"unknown key {path}{_closest(key, list(hints))}")
    return hints[key]


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested plain values (as TOML parses them)."""
    sections = {}
    for section, values in raw.items():
        if section in ("phases", _OLD_PHASES_KEY):
            _require(isinstance(values, list), section, f"must be an array of tables ([[{section}]])")
            continue
        _refuse_replaced(f"[{section}]")
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section [{section}]{_closest(section, [*_SECTIONS, 'phases'])}")
        _require(isinstance(values, dict), f"[{section}]", "must be a table")
        sections[section] = _build_section(_SECTIONS[section], section, values)
    phases = []
    for i, phase in enumerate(_phase_tables(raw)):
        _require(isinstance(phase, dict), f"phases[{i}]", "must be a table")
        phases.append(_build_section(PhaseConfig, "phases", phase))
    return Config(**sections, phases=phases)


def _phase_tables(raw: dict[str, Any]) -> list:
    """The ``[[phases]]`` tables, or those of a config written with the old ``[[stages]]`` key."""
    if _OLD_PHASES_KEY not in raw:
        return raw.get("phases", [])
    if "phases" in raw:
        raise ConfigError("[[stages]] and [[phases]] in one config: [[stages]] is the old name of [[phases]]; "
                          "keep only [[phases]]")
    print("note: [[stages]] is now [[phases]]; read as phases", file=sys.stderr, flush=True)
    return raw[_OLD_PHASES_KEY]


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``--section.key=value`` (leading dashes optional) into (section, key, value).
    The command line also takes ``--section.key value``; the CLI joins those with ``=``."""
    body = text.lstrip("-")
    _require("=" in body, repr(text), "has no value: write --section.key=value or --section.key value")
    path, raw_value = body.split("=", 1)
    _require(path.count(".") == 1, repr(text), "must name section.key, e.g. --optim.lr=3e-4")
    section, key = path.split(".")
    try:  # a TOML value when it is one: numbers, booleans, lists, quoted strings
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file at ``path``, then ``--section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            path = require_file(path, "config file")
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file (not UTF-8): not a TOML config") from None
        except OSError as err:
            raise ConfigError(f"config file {path}: cannot read: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except ConfigError:
            raise
        except UserError as err:  # not a file: the same kind of error as every other config fault
            raise ConfigError(str(err)) from None
    for text in overrides:
        section, key, value = parse_override(text)
        if section in ("phases", _OLD_PHASES_KEY):
            raise ConfigError(f"{text!r}: phases can only be set in the config file")
        _refuse_replaced(f"[{section}]", where=f"{text!r}: ")
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section in {text!r}{_closest(section, list(_SECTIONS))}")
        hints = typing.get_type_hints(_SECTIONS[section])
        if hints.get(key) is str and not isinstance(value, str):
            value = text.split("=", 1)[1]  # e.g. --train.run_dir=2024 stays the string "2024"
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          ("inf" if value > 0 else "-inf"))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; quoted keys, since they may hold dots
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def config_to_toml(cfg: Config) -> str:
    """The whole resolved config as TOML; ``load_config`` of it gives back an equal Config."""
    lines = []
    for section in _SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        tables = {key: value for key, value in values.items() if isinstance(value, dict)}
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if key not in tables]
        # A table field as a [section.key] table of its own, after the plain keys (which would
        # otherwise fall into it): [tune.space] reads as it was written.
        for key, table in tables.items():
            lines += ["", f"[{section}.{key}]"]
            lines += [f"{_toml_key(name)} = {_toml_value(value)}" for name, value in table.items()]
        lines.append("")
    for phase in cfg.phases:
        lines.append("[[phases]]")
        for key, value in dataclasses.asdict(phase).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
