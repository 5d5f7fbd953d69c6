from hvdllm.config import ParallelConfig
from hvdllm.parallel import horovod_environment


def test_horovod_knobs_become_environment():
    env = horovod_environment(ParallelConfig(fusion_threshold_mb=32, cycle_time_ms=0.5,
                                             hierarchical_allreduce=True, timeline="/tmp/t.json"))
    assert env == {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "0.5",
                   "HOROVOD_HIERARCHICAL_ALLREDUCE": "1", "HOROVOD_TIMELINE": "/tmp/t.json",
                   "OMPI_MCA_mpi_yield_when_idle": "1"}
    assert horovod_environment(ParallelConfig(fusion_threshold_mb=-1, cycle_time_ms=-1,
                                              mpi_yield_when_idle=False)) == {}
