"""The process grid: rank coordinates and groups of named axes, computed in one process."""

import pytest

from hvdllm.config import ParallelConfig
from hvdllm.errors import UserError
from hvdllm.parallel import Grid, build_grid, rank_coordinates


def coords(layout):
    return [rank_coordinates(layout, r) for r in range(layout.world_size)]


def test_data_parallel_only():
    layout = build_grid(ParallelConfig(), world_size=4)
    assert layout == Grid(data=4)
    every = coords(layout)
    assert [c.data_rank for c in every] == [0, 1, 2, 3]
    assert all(c.stage == 0 and c.is_first_stage and c.is_last_stage for c in every)
    assert all(c.data_group == (0, 1, 2, 3) for c in every)
    assert [c.pipeline_group for c in every] == [(0,), (1,), (2,), (3,)]
    assert [c.is_logging_rank for c in every] == [True, False, False, False]


def test_data_by_pipeline_stages_are_neighbours():
    layout = build_grid(ParallelConfig(data=2, pipeline=3), world_size=6)
    every = coords(layout)
    assert [(c.data_rank, c.stage) for c in every] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert every[4].pipeline_group == (3, 4, 5) and every[4].data_group == (1, 4)
    assert layout.groups(("data",)) == [[0, 3], [1, 4], [2, 5]]  # one Horovod process set per stage
    assert [c.is_last_stage for c in every] == [False, False, True] * 2
    assert [c.rank for c in every if c.is_logging_rank] == [0]


def test_servers_come_after_the_workers():
    layout = build_grid(ParallelConfig(servers=2), world_size=5)
    assert (layout.data, layout.workers) == (3, 3)
    every = coords(layout)
    assert [c.role for c in every] == ["worker"] * 3 + ["server"] * 2
    assert every[3].stage is None and every[3].data_rank is None and not every[3].is_logging_rank
    assert every[0].data_group == (0, 1, 2)


def test_data_zero_takes_what_the_launch_leaves():
    assert build_grid(ParallelConfig(pipeline=2), world_size=8).data == 4
    assert build_grid(ParallelConfig(pipeline=2, servers=1), world_size=5).data == 2


@pytest.mark.parametrize("cfg, world, message", [
    (ParallelConfig(data=4), 2, "parallel.data=4 x parallel.pipeline=1 + parallel.servers=0 = 4 ranks, "
                                "but the job was launched with 2: launch with -np 4"),
    (ParallelConfig(pipeline=2), 3, "3 launched ranks cannot hold parallel.pipeline=2 stages"),
    (ParallelConfig(servers=2), 2, "2 launched ranks with parallel.servers=2 leave no worker"),
    (ParallelConfig(servers=3), 3, "3 launched ranks with parallel.servers=3 leave no worker"),
    (ParallelConfig(pipeline=2, tensor=2), 6, "6 launched ranks cannot hold parallel.pipeline=2 x parallel.tensor=2"),
    (ParallelConfig(data=2, tensor=2), 8, "parallel.data=2 x parallel.pipeline=1 x parallel.tensor=2 + "
                                          "parallel.servers=0 = 4 ranks, but the job was launched with 8"),
    (ParallelConfig(data=2, pipeline=2, servers=1), 4, "= 5 ranks, but the job was launched with 4"),
])
def test_layouts_that_do_not_fit_the_world(cfg, world, message):
    with pytest.raises(UserError) as err:
        build_grid(cfg, world)
    assert message in str(err.value)


def test_a_rank_outside_the_layout():
    with pytest.raises(ValueError):
        rank_coordinates(Grid(data=2), 2)


def test_tensor_varies_fastest_then_pipeline_then_data():
    grid = build_grid(ParallelConfig(data=2, pipeline=2, tensor=2), world_size=8)
    every = coords(grid)
    assert [(c.data_rank, c.stage, c.tensor_rank) for c in every] == [
        (d, p, t) for d in range(2) for p in range(2) for t in range(2)]
    assert grid.groups(("tensor",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours: one node
    assert grid.groups(("pipeline",)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.groups(("data",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.groups(("tensor", "pipeline")) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one model replica
    assert grid.groups(("data", "pipeline", "tensor")) == [list(range(8))]
    c5 = every[5]
    assert (c5.tensor_group, c5.pipeline_group, c5.data_group) == ((4, 5), (5, 7), (1, 5))
    assert c5.is_first_stage and not c5.is_last_stage and every[6].is_last_stage


@pytest.mark.parametrize("data, pipeline, tensor, servers", [(1, 1, 1, 0), (3, 1, 1, 2), (2, 3, 1, 0),
                                                             (1, 1, 4, 0), (2, 2, 2, 1), (4, 32, 8, 0)])
def test_groups_partition_the_workers_and_coordinates_invert_the_rank(data, pipeline, tensor, servers):
    grid = Grid(data=data, pipeline=pipeline, tensor=tensor, servers=servers)
    for axes in [("data",), ("pipeline",), ("tensor",), ("pipeline", "tensor"), ("data", "tensor")]:
        groups = grid.groups(axes)
        assert sorted(r for g in groups for r in g) == list(range(grid.workers))
        assert all(len(g) == grid.size(axes) for g in groups)
    for rank in range(0, grid.workers, max(1, grid.workers // 50)):
        assert grid.rank(**grid.index(rank)) == rank
    assert [c.role for c in coords(grid)].count("server") == servers


def test_an_unknown_axis_is_named():
    with pytest.raises(ValueError, match="unknown grid axis 'expert'"):
        Grid(data=2).groups(("expert",))
