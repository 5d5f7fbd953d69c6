"""How gradients and layers are spread over ranks. Today: synchronous data parallel."""

from hvdllm.parallel.base import UpdateStrategy
from hvdllm.parallel.sync import HorovodSync, apply_horovod_environment, horovod_environment


def build_strategy(parallel_cfg) -> UpdateStrategy:
    if parallel_cfg.strategy == "sync":
        return HorovodSync(parallel_cfg)
    raise ValueError(f"parallel.strategy: unknown strategy {parallel_cfg.strategy!r}")


__all__ = ["HorovodSync", "UpdateStrategy", "apply_horovod_environment", "build_strategy", "horovod_environment"]
