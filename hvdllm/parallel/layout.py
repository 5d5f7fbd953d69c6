"""The parallel layout of a job, and where each rank sits in it.

A layout is checked against the launched world size before any communication runtime
starts, so a job launched with the wrong ``-np`` ends on every rank with the same line
instead of hanging in its first collective (torchtitan's ``ParallelDims`` does the same).

Rank order. The ``data x pipeline`` workers come first, the parameter servers (if any)
last. Among workers the pipeline index varies fastest::

    rank = data_rank * pipeline + stage

so the stages of one pipeline are neighbours (on one node, where activations travel
fastest point to point) and each stage's data-parallel group strides across nodes, as
gradients are allreduced once per step and fuse into large messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvdllm.errors import UserError

WORKER, SERVER = "worker", "server"


@dataclass(frozen=True)
class Layout:
    """How the launched ranks are spread: ``data * pipeline`` workers plus ``servers``."""

    data: int  # data-parallel degree (replicas of each pipeline stage)
    pipeline: int = 1  # pipeline stages across ranks
    servers: int = 0  # parameter-server ranks (asynchronous updates)
    devices: tuple[str, ...] = ()  # devices driven by each worker rank; () = the rank's own

    @property
    def workers(self) -> int:
        return self.data * self.pipeline

    @property
    def world_size(self) -> int:
        return self.workers + self.servers

    def data_groups(self) -> list[list[int]]:
        """One group per pipeline stage: the ranks holding that stage, by data rank."""
        return [[d * self.pipeline + stage for d in range(self.data)] for stage in range(self.pipeline)]

    def pipeline_groups(self) -> list[list[int]]:
        """One group per data rank: the ranks holding that pipeline's stages, in stage order."""
        return [[d * self.pipeline + stage for stage in range(self.pipeline)] for d in range(self.data)]


def build_layout(parallel_cfg, world_size: int) -> Layout:
    """The layout that ``[parallel]`` asks for on ``world_size`` launched ranks.

    ``parallel.data = 0`` takes whatever the launch leaves for data parallelism. Raises
    UserError with one line naming the keys when the degrees do not multiply and add up to
    the world size.
    """
    pipeline, servers = parallel_cfg.pipeline, parallel_cfg.servers
    data = parallel_cfg.data
    if data == 0:
        data, rest = divmod(world_size - servers, pipeline)
        if rest or data < 1:
            raise UserError(f"{world_size} launched ranks cannot hold parallel.pipeline={pipeline} stages "
                            f"+ parallel.servers={servers}: launch with a multiple of {pipeline} "
                            f"plus {servers} ranks")
    layout = Layout(data=data, pipeline=pipeline, servers=servers, devices=tuple(parallel_cfg.devices))
    if layout.world_size != world_size:
        raise UserError(f"parallel.data={data} x parallel.pipeline={pipeline} + parallel.servers={servers} "
                        f"= {layout.world_size} ranks, but the job was launched with {world_size}: "
                        f"launch with -np {layout.world_size} or change [parallel]")
    return layout


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in a layout."""

    rank: int
    role: str  # WORKER or SERVER
    stage: int | None  # pipeline stage this rank holds; None for a server
    data_rank: int | None  # index in its stage's data-parallel group; None for a server
    data_group: tuple[int, ...]  # ranks holding the same stage (the gradient allreduce), by data rank
    pipeline_group: tuple[int, ...]  # ranks holding this pipeline's stages, in stage order
    is_logging_rank: bool  # prints, logs metrics and writes the run's files

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage is not None and self.stage == len(self.pipeline_group) - 1


def rank_coordinates(layout: Layout, rank: int) -> RankCoords:
    """Pure function of the layout: the role, pipeline stage and groups of ``rank``.

    Rank 0 (first stage, data rank 0) is the logging rank: the loss is produced on the last
    stage but reduced over all ranks with the step statistics, so rank 0 has it too.
    """
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} is outside a layout of {layout.world_size} ranks")
    if rank >= layout.workers:
        return RankCoords(rank, SERVER, None, None, (), (), is_logging_rank=False)
    data_rank, stage = divmod(rank, layout.pipeline)
    return RankCoords(rank, WORKER, stage, data_rank,
                      data_group=tuple(layout.data_groups()[stage]),
                      pipeline_group=tuple(layout.pipeline_groups()[data_rank]),
                      is_logging_rank=rank == 0)
