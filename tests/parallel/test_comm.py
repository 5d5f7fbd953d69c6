# gloo: yes
import os

import torch

from hvdllm import comm


def test_rank_size_local(horovod):
    assert comm.size() == 2 and comm.local_size() == 2
    assert comm.rank() == comm.local_rank() == horovod.rank()
    ranks = horovod.allgather_object(comm.rank())
    assert sorted(ranks) == [0, 1]


def test_allreduce_sum_and_average(horovod):
    x = torch.full((5,), float(comm.rank() + 1))
    assert torch.all(horovod.allreduce(x, op=horovod.Sum, name="t_sum") == 3.0)
    assert torch.all(horovod.allreduce(x, op=horovod.Average, name="t_avg") == 1.5)


def test_barrier_and_print0(horovod, capsys):
    comm.barrier()
    comm.print0("only rank zero")
    out = capsys.readouterr().out
    assert ("only rank zero" in out) == (comm.rank() == 0)


def test_device_and_threads():
    assert comm.choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.get_num_threads() == 1  # init(threads=1) in conftest
    assert comm.threads_per_rank(2, cores=16) == 8 and comm.threads_per_rank(4, cores=2) == 1


def test_launcher_environment_seen():
    launched_by = "OMPI_COMM_WORLD_RANK" in os.environ or "HOROVOD_RANK" in os.environ
    assert launched_by
