"""The process grid of a job: named axes (tensor, pipeline, data) and the server role, checked
against the launched world before anything starts; groups of any axes; pure rank coordinates.
Rank order and why: docs/design/parallel.md (The process grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterable

from hvdllm.errors import UserError

WORKER, SERVER = "worker", "server"
AXES = ("tensor", "pipeline", "data")  # fastest-varying first


@dataclass(frozen=True)
class Grid:
    """How the launched ranks are spread: ``tensor * pipeline * data`` workers plus ``servers``."""

    data: int  # data-parallel degree (replicas of each model part)
    pipeline: int = 1  # pipeline stages across ranks
    tensor: int = 1  # ranks splitting each layer (tensor parallelism)
    servers: int = 0  # parameter-server ranks (asynchronous updates)
    devices: tuple[str, ...] = ()  # devices driven by each worker rank; () = the rank's own

    @property
    def workers(self) -> int:
        return self.data * self.pipeline * self.tensor

    @property
    def world_size(self) -> int:
        return self.workers + self.servers

    def size(self, axes: Iterable[str]) -> int:
        """The number of ranks in one group of ``axes``."""
        result = 1
        for axis in _checked(axes):
            result *= getattr(self, axis)
        return result

    def index(self, rank: int) -> dict[str, int]:
        """A worker's index along every axis."""
        if not 0 <= rank < self.workers:
            raise ValueError(f"rank {rank} is not a worker of a grid of {self.workers} workers")
        index, rest = {}, rank
        for axis in AXES:
            rest, index[axis] = divmod(rest, getattr(self, axis))
        return index

    def rank(self, tensor: int = 0, pipeline: int = 0, data: int = 0) -> int:
        """The worker at these indices."""
        return (data * self.pipeline + pipeline) * self.tensor + tensor

    def groups(self, axes: Iterable[str]) -> list[list[int]]:
        """Every group of ``axes``: the workers that share their indices on all other axes,
        each group in rank order, the groups ordered by their first rank. Groups of ``("data",)``
        are the gradient reductions of each model part, of ``("pipeline",)`` the pipelines."""
        axes = _checked(axes)
        fixed = [axis for axis in AXES if axis not in axes]
        result = []
        for values in product(*(range(getattr(self, axis)) for axis in fixed)):
            base = dict(zip(fixed, values))
            members = [self.rank(**base, **dict(zip(axes, moving)))
                       for moving in product(*(range(getattr(self, axis)) for axis in axes))]
            result.append(sorted(members))
        return sorted(result)

    def group_of(self, rank: int, axes: Iterable[str]) -> tuple[int, ...]:
        """The group of ``axes`` that worker ``rank`` belongs to."""
        return next(tuple(group) for group in self.groups(axes) if rank in group)

    def degrees(self) -> str:
        """The grid in one phrase, as the banner and resume lines say it."""
        parts = [f"{getattr(self, axis)} {axis}" for axis in reversed(AXES) if getattr(self, axis) > 1]
        if self.servers:
            parts.append(f"{self.servers} servers")
        return " x ".join(parts) or "1 rank"


def _checked(axes: Iterable[str]) -> tuple[str, ...]:
    axes = tuple(axes)
    for axis in axes:
        if axis not in AXES:
            raise ValueError(f"unknown grid axis {axis!r}: one of {', '.join(AXES)}")
    return axes


def build_grid(parallel_cfg, world_size: int) -> Grid:
    """The grid that ``[parallel]`` asks for on ``world_size`` launched ranks.

    ``parallel.data = 0`` takes whatever the launch leaves for data parallelism. Raises
    UserError with one line naming the keys when the degrees do not multiply and add up to
    the world size.
    """
    pipeline, tensor, servers, data = (parallel_cfg.pipeline, parallel_cfg.tensor, parallel_cfg.servers,
                                       parallel_cfg.data)
    model_ranks = pipeline * tensor
    degrees = f"parallel.pipeline={pipeline}" + (f" x parallel.tensor={tensor}" if tensor > 1 else "")
    parts = f"{degrees} model parts" if tensor > 1 else f"{degrees} stages"
    if data == 0:
        if servers and world_size <= servers:
            raise UserError(f"{world_size} launched ranks with parallel.servers={servers} leave no worker: "
                            f"launch at least {servers + model_ranks} ranks")
        data, rest = divmod(world_size - servers, model_ranks)
        if rest or data < 1:
            raise UserError(f"{world_size} launched ranks cannot hold {parts} + "
                            f"parallel.servers={servers}: launch with a multiple of {model_ranks} "
                            f"plus {servers} ranks")
    grid = Grid(data=data, pipeline=pipeline, tensor=tensor, servers=servers, devices=tuple(parallel_cfg.devices))
    if grid.world_size != world_size:
        raise UserError(f"parallel.data={data} x {degrees} + parallel.servers={servers} "
                        f"= {grid.world_size} ranks, but the job was launched with {world_size}: "
                        f"launch with -np {grid.world_size} or change [parallel]")
    return grid


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in a grid."""

    rank: int
    role: str  # WORKER or SERVER
    stage: int | None  # pipeline stage this rank holds; None for a server
    data_rank: int | None  # index in its data-parallel group; None for a server
    tensor_rank: int | None  # index in its tensor-parallel group; None for a server
    data_group: tuple[int, ...]  # ranks holding the same model part (the gradient allreduce), by data rank
    pipeline_group: tuple[int, ...]  # ranks holding this pipeline's stages, in stage order
    tensor_group: tuple[int, ...]  # ranks splitting the same layers, by tensor rank
    is_logging_rank: bool  # prints, logs metrics and writes the run's files

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage is not None and self.stage == len(self.pipeline_group) - 1


def rank_coordinates(grid: Grid, rank: int) -> RankCoords:
    """Pure function of the grid: the role, indices and groups of ``rank``.

    Rank 0 (first stage, data and tensor rank 0) is the logging rank: the loss is produced on
    the last stage but reduced over all ranks with the step statistics, so rank 0 has it too.
    """
    if not 0 <= rank < grid.world_size:
        raise ValueError(f"rank {rank} is outside a grid of {grid.world_size} ranks")
    if rank >= grid.workers:
        return RankCoords(rank, SERVER, None, None, None, (), (), (), is_logging_rank=False)
    index = grid.index(rank)
    return RankCoords(rank, WORKER, index["pipeline"], index["data"], index["tensor"],
                      data_group=grid.group_of(rank, ("data",)),
                      pipeline_group=grid.group_of(rank, ("pipeline",)),
                      tensor_group=grid.group_of(rank, ("tensor",)),
                      is_logging_rank=rank == 0)
