from hvdllm.config import ParallelConfig
from hvdllm.parallel import SingleProcess, build_strategy, horovod_environment


def test_horovod_knobs_become_environment():
    env = horovod_environment(ParallelConfig(fusion_threshold_mb=32, cycle_time_ms=0.5,
                                             hierarchical_allreduce=True, timeline="/tmp/t.json"))
    assert env == {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "0.5",
                   "HOROVOD_HIERARCHICAL_ALLREDUCE": "1", "HOROVOD_TIMELINE": "/tmp/t.json",
                   "OMPI_MCA_mpi_yield_when_idle": "1"}
    assert horovod_environment(ParallelConfig(fusion_threshold_mb=-1, cycle_time_ms=-1,
                                              mpi_yield_when_idle=False)) == {}


def test_one_launched_rank_trains_without_horovod():
    assert isinstance(build_strategy(ParallelConfig(), launched_ranks=1), SingleProcess)
