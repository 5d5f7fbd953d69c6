from hvdllm.comm import threads_per_rank
from hvdllm.comm.launch import launched_world_size


def test_threads_per_rank():
    assert threads_per_rank(1, cores=2) == 2
    assert threads_per_rank(3, cores=2) == 1


def test_launched_world_size_from_each_launcher():
    assert launched_world_size({}) == 1
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert launched_world_size({"HOROVOD_SIZE": "2"}) == 2  # horovodrun --gloo
    assert launched_world_size({"PMI_SIZE": "8"}) == 8
    assert launched_world_size({"SLURM_STEP_NUM_TASKS": "16"}) == 16
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "1", "SLURM_STEP_NUM_TASKS": "16"}) == 1
