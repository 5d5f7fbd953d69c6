"""How work and updates are spread over ranks: the layout, and the strategy that runs it."""

from typing import Callable

from hvdllm.errors import UserError
from hvdllm.model.presets import gpt_config_from
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.batching import resolve_batching
from hvdllm.parallel.grid import Grid, RankCoords, build_grid, rank_coordinates
from hvdllm.parallel.partition import check_manual_cut
from hvdllm.parallel.precision import Precision
from hvdllm.parallel.single import SingleProcess
from hvdllm.parallel.sync import HorovodDataParallel, apply_horovod_environment, horovod_environment
from hvdllm.parallel.update import AllreduceUpdate


def build_strategy(cfg, world_size: int, server_setup: Callable | None = None) -> ParallelStrategy:
    """The strategy for ``cfg.parallel`` on ``world_size`` launched ranks, checked before any
    communication starts (each rank runs this on the same input and fails the same way).

    A job of one process needs no communication runtime, so it runs without Horovod
    (:class:`SingleProcess`). Call ``setup()`` on the result to start communication.
    ``server_setup`` builds what a parameter server needs from the training layer
    (``hvdllm.train.server_setup.server_setup``; only parallel.strategy=async's servers use it).
    """
    cfg = resolve_batching(cfg, world_size)  # as the caller did, when it needs the result itself
    parallel = cfg.parallel
    layout = build_grid(parallel, world_size)
    check_model_cut(cfg, layout)
    check_tensor_layout(cfg, layout)
    if parallel.strategy == "async":
        from hvdllm.parallel.param_server import ParameterServerWorker, check_async_layout

        check_async_layout(cfg, layout)
        return ParameterServerWorker(cfg, layout, server_setup)
    if layout.servers:
        raise UserError(f"parallel.servers={layout.servers} needs an asynchronous parallel.strategy, "
                        f"not {parallel.strategy!r}")
    rule = choose_update_rule(cfg, layout)
    if rule is None:
        return SingleProcess(cfg, layout)
    if layout.pipeline > 1 or layout.tensor > 1:
        from hvdllm.parallel.pipeline import ModelParallel

        return ModelParallel(cfg, layout, rule)
    return HorovodDataParallel(cfg, layout, rule)


def choose_update_rule(cfg, layout: Grid):
    """The update rule ``[parallel]`` asks for, checked against the grid before any init; None
    for a single process that has nothing to agree on with anyone."""
    parallel = cfg.parallel
    if parallel.strategy == "local-sgd":
        from hvdllm.parallel.local_sgd import LocalSGDUpdate, check_local_sgd_layout

        check_local_sgd_layout(cfg, layout)
        return LocalSGDUpdate  # on one rank too: the outer optimizer still acts
    if parallel.zero:
        from hvdllm.parallel.zero import ShardedUpdate

        return ShardedUpdate if layout.world_size > 1 else None
    if parallel.op == "adasum":
        from hvdllm.parallel.adasum import AdasumUpdate, check_adasum_layout

        check_adasum_layout(layout, cfg.train.precision)
        if layout.world_size > 1:
            return AdasumUpdate
    return AllreduceUpdate if layout.world_size > 1 else None


def check_tensor_layout(cfg, layout: Grid) -> None:
    """What splitting every layer over ``parallel.tensor`` ranks needs, checked before any
    communication (the vocabulary is checked when the model is split: it may come from the data)."""
    t = layout.tensor
    if t == 1:
        if cfg.parallel.sequence_parallel:
            raise UserError("parallel.sequence_parallel splits the tensor group's work along the sequence: it needs "
                            "parallel.tensor > 1")
        return
    try:
        n_head = gpt_config_from(cfg.model).n_head
    except ValueError as err:  # an unknown preset
        raise UserError(str(err)) from None
    if n_head % t:
        raise UserError(f"parallel.tensor={t} must divide model.n_head={n_head}: each rank takes whole heads")
    if layout.devices:
        raise UserError("parallel.tensor > 1 and parallel.devices cannot be combined: choose one")


def check_model_cut(cfg, layout: Grid) -> None:
    """What a cut into pipeline stages or placed devices needs of the model and the batch,
    checked before any communication: a block per stage, and micro-batches dividing every
    batch size of the run."""
    stages = max(layout.pipeline, len(layout.devices))
    if stages == 1:
        return
    parallel = cfg.parallel
    key = "parallel.pipeline" if layout.pipeline > 1 else "parallel.devices"
    if layout.pipeline > 1 and len(layout.devices) > 1:
        raise UserError("parallel.pipeline > 1 and several parallel.devices cannot be combined: choose one")
    try:
        n_layer = gpt_config_from(cfg.model).n_layer
    except ValueError as err:  # an unknown preset
        raise UserError(str(err)) from None
    if stages > n_layer:
        raise UserError(f"{key} asks for {stages} stages but the model has {n_layer} blocks (model.n_layer)")
    if parallel.stage_layers:
        check_manual_cut(parallel.stage_layers, stages, n_layer)
    batches = {"data.batch_size": cfg.data.batch_size}
    if cfg.data.global_batch_size:
        batches = {"data.global_batch_size / (data x accum_steps)":
                   cfg.data.global_batch_size // (layout.data * parallel.accum_steps)}
    batches.update({f"phases[{i}].batch_size": p.batch_size for i, p in enumerate(cfg.phases) if p.batch_size})
    for name, size in batches.items():
        if size % parallel.micro_batches:
            raise UserError(f"parallel.micro_batches={parallel.micro_batches} does not divide {name} {size}")


__all__ = ["HorovodDataParallel", "Grid", "ParallelStrategy", "Precision", "RankCoords", "SingleProcess",
           "apply_horovod_environment", "build_grid", "build_strategy", "resolve_batching", "horovod_environment",
           "rank_coordinates"]
