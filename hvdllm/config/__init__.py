"""Configuration: one dataclass per concern (:mod:`hvdllm.config.sections`), loaded from TOML
and overridden from the CLI (:mod:`hvdllm.config.loading`). CLI > TOML > defaults."""

from hvdllm.config.loading import config_from_dict, config_to_toml, load_config, parse_override
from hvdllm.config.sections import (CheckpointConfig, Config, ConfigError, DataConfig, LogConfig, ModelConfig,
                                    OptimConfig, ParallelConfig, PhaseConfig, ScheduleConfig, TrainConfig, TuneConfig)

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "PhaseConfig", "ScheduleConfig", "TrainConfig", "TuneConfig", "config_from_dict",
           "config_to_toml", "load_config", "parse_override"]
