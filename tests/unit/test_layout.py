"""Rank coordinates of parallel layouts, computed in one process."""

import pytest

from hvdllm.config import ParallelConfig
from hvdllm.errors import UserError
from hvdllm.parallel import Layout, build_layout, rank_coordinates


def coords(layout):
    return [rank_coordinates(layout, r) for r in range(layout.world_size)]


def test_data_parallel_only():
    layout = build_layout(ParallelConfig(), world_size=4)
    assert layout == Layout(data=4)
    every = coords(layout)
    assert [c.data_rank for c in every] == [0, 1, 2, 3]
    assert all(c.stage == 0 and c.is_first_stage and c.is_last_stage for c in every)
    assert all(c.data_group == (0, 1, 2, 3) for c in every)
    assert [c.pipeline_group for c in every] == [(0,), (1,), (2,), (3,)]
    assert [c.is_logging_rank for c in every] == [True, False, False, False]


def test_data_by_pipeline_stages_are_neighbours():
    layout = build_layout(ParallelConfig(data=2, pipeline=3), world_size=6)
    every = coords(layout)
    assert [(c.data_rank, c.stage) for c in every] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert every[4].pipeline_group == (3, 4, 5) and every[4].data_group == (1, 4)
    assert layout.data_groups() == [[0, 3], [1, 4], [2, 5]]  # one Horovod process set per stage
    assert [c.is_last_stage for c in every] == [False, False, True] * 2
    assert [c.rank for c in every if c.is_logging_rank] == [0]


def test_servers_come_after_the_workers():
    layout = build_layout(ParallelConfig(servers=2), world_size=5)
    assert (layout.data, layout.workers) == (3, 3)
    every = coords(layout)
    assert [c.role for c in every] == ["worker"] * 3 + ["server"] * 2
    assert every[3].stage is None and every[3].data_rank is None and not every[3].is_logging_rank
    assert every[0].data_group == (0, 1, 2)


def test_data_zero_takes_what_the_launch_leaves():
    assert build_layout(ParallelConfig(pipeline=2), world_size=8).data == 4
    assert build_layout(ParallelConfig(pipeline=2, servers=1), world_size=5).data == 2


@pytest.mark.parametrize("cfg, world, message", [
    (ParallelConfig(data=4), 2, "parallel.data=4 x parallel.pipeline=1 + parallel.servers=0 = 4 ranks, "
                                "but the job was launched with 2: launch with -np 4"),
    (ParallelConfig(pipeline=2), 3, "3 launched ranks cannot hold parallel.pipeline=2 stages"),
    (ParallelConfig(servers=2), 2, "2 launched ranks cannot hold parallel.pipeline=1 stages + parallel.servers=2"),
    (ParallelConfig(data=2, pipeline=2, servers=1), 4, "= 5 ranks, but the job was launched with 4"),
])
def test_layouts_that_do_not_fit_the_world(cfg, world, message):
    with pytest.raises(UserError) as err:
        build_layout(cfg, world)
    assert message in str(err.value)


def test_a_rank_outside_the_layout():
    with pytest.raises(ValueError):
        rank_coordinates(Layout(data=2), 2)
