"""How gradients and layers are spread over ranks. Today: synchronous data parallel."""

from hvdllm.parallel.base import UpdateStrategy
from hvdllm.parallel.single import SingleProcess
from hvdllm.parallel.sync import HorovodSync, apply_horovod_environment, horovod_environment


def build_strategy(parallel_cfg, launched_ranks: int) -> UpdateStrategy:
    """The strategy for ``parallel.strategy``; a job launched as one process needs no
    communication runtime, so it runs without Horovod (:class:`SingleProcess`). Horovod must
    already be initialized when ``launched_ranks > 1``."""
    if parallel_cfg.strategy != "sync":
        raise ValueError(f"parallel.strategy: unknown strategy {parallel_cfg.strategy!r}")
    if launched_ranks == 1:
        return SingleProcess()
    return HorovodSync(parallel_cfg)


__all__ = ["HorovodSync", "SingleProcess", "UpdateStrategy", "apply_horovod_environment", "build_strategy",
           "horovod_environment"]
