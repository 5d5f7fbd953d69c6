"""How work and updates are spread over ranks: the layout, and the strategy that runs it."""

from hvdllm.errors import UserError
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.layout import Layout, RankCoords, build_layout, rank_coordinates
from hvdllm.parallel.precision import Precision
from hvdllm.parallel.single import SingleProcess
from hvdllm.parallel.sync import HorovodSync, apply_horovod_environment, horovod_environment


def build_strategy(cfg, world_size: int) -> ParallelStrategy:
    """The strategy for ``cfg.parallel`` on ``world_size`` launched ranks, checked before any
    communication starts (each rank runs this on the same input and fails the same way).

    A job of one process needs no communication runtime, so it runs without Horovod
    (:class:`SingleProcess`). Call ``setup()`` on the result to start communication.
    """
    parallel = cfg.parallel
    layout = build_layout(parallel, world_size)
    if layout.pipeline > 1:
        raise UserError("parallel.pipeline > 1 (pipeline stages across ranks) is not available yet: "
                        "use parallel.pipeline=1")
    if len(layout.devices) > 1:
        raise UserError("parallel.devices with more than one device (layer placement) is not available yet")
    if layout.servers:
        raise UserError(f"parallel.servers={layout.servers} needs an asynchronous parallel.strategy, "
                        f"not {parallel.strategy!r}")
    if parallel.op == "adasum":
        from hvdllm.parallel.adasum import HorovodAdasum, check_adasum_layout

        check_adasum_layout(layout, cfg.train.precision)
        if world_size > 1:
            return HorovodAdasum(parallel, layout)
    if world_size == 1:
        return SingleProcess(parallel, layout)
    return HorovodSync(parallel, layout)


__all__ = ["HorovodSync", "Layout", "ParallelStrategy", "Precision", "RankCoords", "SingleProcess",
           "apply_horovod_environment", "build_layout", "build_strategy", "horovod_environment",
           "rank_coordinates"]
