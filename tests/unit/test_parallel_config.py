from dataclasses import replace

import pytest

from hvdllm.config import ConfigError, ParallelConfig, load_config
from hvdllm.config.sections import PhaseConfig
from hvdllm.errors import UserError
from hvdllm.parallel import SingleProcess, build_strategy, horovod_environment, resolve_batching


def test_horovod_knobs_become_environment():
    env = horovod_environment(ParallelConfig(fusion_threshold_mb=32, cycle_time_ms=0.5,
                                             hierarchical_allreduce=True, timeline="/tmp/t.json"))
    assert env == {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "0.5",
                   "HOROVOD_HIERARCHICAL_ALLREDUCE": "1", "HOROVOD_TIMELINE": "/tmp/t.json",
                   "OMPI_MCA_mpi_yield_when_idle": "1"}
    assert horovod_environment(ParallelConfig(fusion_threshold_mb=-1, cycle_time_ms=-1,
                                              mpi_yield_when_idle=False)) == {}


def test_one_launched_rank_trains_without_horovod():
    assert isinstance(build_strategy(load_config(), world_size=1), SingleProcess)


def test_load_balance_needs_a_parameter_server():
    with pytest.raises(ConfigError, match=r"^parallel.load_balance needs parallel.strategy=async"):
        load_config(None, ["--parallel.load_balance=true"])


def test_old_data_parallel_key_names_its_replacement():
    with pytest.raises(ConfigError, match=r"^parallel.data_parallel was replaced by parallel.data \("):
        load_config(None, ["--parallel.data_parallel=2"])


@pytest.mark.parametrize("overrides, world, message", [
    (["--parallel.pipeline=2", "--parallel.devices=['cpu','cpu']"], 2, "cannot be combined"),
    (["--parallel.devices=['cpu','cpu','cpu']", "--model.preset=gpt-nano"], 1,
     "parallel.devices asks for 3 stages but the model has 2 blocks"),
    (["--parallel.pipeline=2", "--parallel.op=adasum"], 2, "parallel.op=adasum works on Horovod's global process set"),
    (["--parallel.servers=1"], 3, "parallel.servers=1 needs an asynchronous parallel.strategy, not 'sync'"),
    (["--parallel.op=adasum"], 3, "parallel.op=adasum needs a power-of-two number of ranks"),
    (["--parallel.strategy=async", "--parallel.servers=1", "--parallel.max_staleness=1",
      "--parallel.load_balance=true"], 3, "parallel.load_balance splits the global batch of a synchronous clock: "
                                          "it needs parallel.max_staleness=0"),
    (["--parallel.op=adasum", "--train.precision=fp16"], 2, "parallel.op=adasum with train.precision=fp16"),
    (["--parallel.data=3"], 2, "parallel.data=3 x parallel.pipeline=1 + parallel.servers=0 = 3 ranks, "
                               "but the job was launched with 2"),
    (["--parallel.tensor=4", "--model.preset=gpt-micro"], 4, "parallel.tensor=4 must divide model.n_head=6: "
                                                              "each rank takes whole heads"),
    (["--parallel.tensor=2", "--parallel.devices=['cpu','cpu']"], 2, "parallel.tensor > 1 and parallel.devices"),
    (["--parallel.tensor=2", "--parallel.op=adasum"], 2, "not per model part"),
    (["--parallel.tensor=2", "--parallel.strategy=async", "--parallel.servers=1"], 3,
     "parallel.strategy=async pushes whole-model gradients: use parallel.pipeline=1, parallel.tensor=1"),
    (["--parallel.tensor=2"], 3, "3 launched ranks cannot hold parallel.pipeline=1 x parallel.tensor=2 model parts"),
    (["--parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel splits the tensor group's work along the "
                                               "sequence: it needs parallel.tensor > 1"),
])
def test_layouts_that_cannot_run_are_refused_before_any_communication(overrides, world, message):
    with pytest.raises(UserError) as err:
        build_strategy(load_config(None, overrides), world_size=world)
    assert message in str(err.value)


@pytest.mark.parametrize("slow_rank, expected", [(0, [1.0]), (1, [])])
def test_the_slowed_rank_sleeps_factor_minus_one_times_its_compute(slow_rank, expected, monkeypatch):
    cfg = load_config(None, [f"--train.slowdown_rank={slow_rank}", "--train.slowdown_factor=3"])
    strategy = build_strategy(cfg, world_size=1)
    strategy.setup(threads=1)
    slept = []
    monkeypatch.setattr("hvdllm.parallel.base.time.sleep", slept.append)
    strategy.inject_slowdown(0.5)
    assert slept == expected


ELASTIC = {"HOROVOD_ELASTIC": "1"}


@pytest.mark.parametrize("overrides, environ, message", [
    (["--data.global_batch_size=12"], {}, "parallel.elastic needs horovodrun's elastic mode"),
    (["--data.global_batch_size=12", "--parallel.strategy=local-sgd"], ELASTIC, "works with parallel.strategy=sync"),
    (["--data.global_batch_size=12", "--parallel.data=2"], ELASTIC, "leave parallel.data at 0"),
    ([], ELASTIC, "parallel.elastic needs data.global_batch_size"),
])
def test_elastic_refuses_what_it_cannot_follow_in_one_line(overrides, environ, message):
    from hvdllm.parallel.grid import build_grid
    from hvdllm.train.elastic import check_elastic

    cfg = load_config(None, ["--parallel.elastic=true", *overrides])
    with pytest.raises(UserError, match=message):
        check_elastic(cfg, build_grid(cfg.parallel, 2), environ)


def test_elastic_takes_a_sync_run_with_a_global_batch():
    from hvdllm.parallel.grid import build_grid
    from hvdllm.train.elastic import check_elastic

    cfg = load_config(None, ["--parallel.elastic=true", "--data.global_batch_size=12"])
    check_elastic(cfg, build_grid(cfg.parallel, 3), ELASTIC)


def test_continue_without_dead_needs_a_launcher_that_keeps_the_survivors():
    from hvdllm.parallel.ps_protocol import launcher_keeps_survivors

    assert not launcher_keeps_survivors({"OMPI_COMM_WORLD_SIZE": "3"})
    assert launcher_keeps_survivors({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_MCA_orte_enable_recovery": "1"})
    assert launcher_keeps_survivors({"SLURM_STEP_NUM_TASKS": "3"})  # srun cannot be asked


def test_the_gpt3_layout_config_is_the_planned_shape_on_eight_ranks():
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "gpt3-175b-layout-mini.toml"
    strategy = build_strategy(load_config(str(config), []), world_size=8)
    grid = strategy.layout
    assert (grid.tensor, grid.pipeline, grid.data) == (2, 2, 2)
    assert grid.groups(("tensor",))[0] == [0, 1] and grid.groups(("pipeline",))[0] == [0, 2]


@pytest.mark.parametrize("overrides, world, expected", [
    (["--parallel.pipeline=2"], 2, 8),  # batch 8: 4 x 2 stages would be 8, and 8 divides it
    (["--parallel.pipeline=2", "--data.batch_size=12"], 2, 6),  # 8 does not divide 12
    (["--parallel.pipeline=2", "--data.batch_size=7"], 2, 7),
    (["--parallel.pipeline=2", "--data.batch_size=9"], 2, 3),
    (["--parallel.devices=['cpu','cpu']", "--data.batch_size=4"], 1, 4),
    (["--parallel.pipeline=2", "--parallel.micro_batches=2"], 2, 2),  # as given
    ([], 2, 1),  # no stages: nothing to overlap
])
def test_pipeline_micro_batches_default_to_a_count_that_pipelines(overrides, world, expected):
    assert resolve_batching(load_config(None, overrides), world).parallel.micro_batches == expected


def test_phases_batch_sizes_bound_the_automatic_micro_batches():
    cfg = load_config(None, ["--parallel.pipeline=2", "--data.batch_size=8"])
    cfg = replace(cfg, phases=[PhaseConfig(steps=2, batch_size=4), PhaseConfig(steps=2)])
    assert resolve_batching(cfg, 2).parallel.micro_batches == 4


@pytest.mark.parametrize("overrides, world, accum", [
    (["--data.global_batch_size=64", "--data.batch_size=8"], 2, 4),
    (["--data.global_batch_size=64", "--data.batch_size=8", "--parallel.accum_steps=4"], 2, 4),
    (["--data.global_batch_size=32", "--data.batch_size=4", "--parallel.pipeline=2"], 4, 4),  # data degree 2
])
def test_a_global_batch_derives_the_accumulation_and_keeps_the_micro_batch(overrides, world, accum):
    cfg = resolve_batching(load_config(None, overrides), world)
    assert cfg.parallel.accum_steps == accum and cfg.data.batch_size == load_config(None, overrides).data.batch_size
