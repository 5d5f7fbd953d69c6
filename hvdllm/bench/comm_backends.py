"""The communication libraries under ``hvdllm bench comm``, behind one interface, and the
control plane that coordinates the ranks while they are measured.

Each backend's ``prepare(op, dtype, count)`` returns a function that runs the op once and
returns the result as a numpy array for checking, or raises NotImplementedError with the
reason.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

import numpy as np
import torch

from hvdllm.bench import comm_report as rep

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Control:
    """The control plane: rank, size, gathering timings. mpi4py in an MPI job, else Horovod."""

    def __init__(self, mpi_comm=None, hvd=None) -> None:
        self.mpi, self.hvd = mpi_comm, hvd
        self.rank = mpi_comm.rank if mpi_comm is not None else hvd.rank()
        self.size = mpi_comm.size if mpi_comm is not None else hvd.size()

    def allgather(self, obj):
        if self.mpi is not None:
            return self.mpi.allgather(obj)
        return self.hvd.allgather_object(obj, name="bench_control")

    def barrier(self) -> None:
        if self.mpi is not None:
            self.mpi.Barrier()
        else:
            self.hvd.barrier()

    def agree(self, ok: bool) -> bool:
        return all(self.allgather(bool(ok)))

    def hosts(self) -> list[str]:
        """Every rank's host name, in rank order."""
        return self.allgather(socket.gethostname())

    def local_rank(self) -> int:
        """This rank's index among the ranks on its host, whatever launched the job."""
        hosts = self.hosts()
        return hosts[: self.rank].count(hosts[self.rank])

    def host_slots(self) -> str:
        """``host1:k,host2:m``: where this job's ranks run, for a sub-job on the same hosts."""
        hosts = self.hosts()
        return ",".join(f"{h}:{hosts.count(h)}" for h in dict.fromkeys(hosts))

    def on_rank0_while_others_sleep(self, work: Callable[[], object]):
        """Run ``work`` on rank 0 (its result there, None elsewhere); the other MPI ranks wait
        in a polled, sleeping barrier, since a busy MPI barrier would steal the sub-job's cores."""
        result = work() if self.rank == 0 else None
        done = self.mpi.Ibarrier()
        while not done.Test():
            time.sleep(0.05)
        return result


# --- backends -----------------------------------------------------------------------------

class Mpi4pyBackend:
    name = "mpi4py"

    def __init__(self, comm) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm

    def prepare(self, op: str, dtype: str, count: int) -> Callable[[], np.ndarray]:
        if dtype != "fp32":
            raise NotImplementedError("MPI has no standard fp16/bf16 reduction type")
        MPI, comm, n, r = self.MPI, self.comm, self.comm.size, self.comm.rank
        send_count = count // n if op == "allgather" else count
        send = rep.inputs_for(op, r, n, send_count).astype(np.float32)
        if op == "allreduce":  # in place, as a gradient allreduce is; checked on the first call
            buf = send.copy()
            return lambda: (comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), buf)[1]
        if op == "allgather":
            recv = np.empty(send_count * n, dtype=np.float32)
            return lambda: (comm.Allgather(send, recv), recv)[1]
        if op == "broadcast":
            buf = send.copy()
            return lambda: (comm.Bcast(buf, root=0), buf)[1]
        if op == "reducescatter":
            recv = np.empty(count // n, dtype=np.float32)
            return lambda: (comm.Reduce_scatter_block(send, recv, op=MPI.SUM), recv)[1]
        if op == "alltoall":
            recv = np.empty_like(send)
            return lambda: (comm.Alltoall(send, recv), recv)[1]
        if op == "sendrecv":
            recv = np.empty_like(send)
            return lambda: (comm.Sendrecv(send, dest=(r + 1) % n, recvbuf=recv, source=(r - 1) % n), recv)[1]
        raise NotImplementedError(op)


class TorchDistBackend:
    def __init__(self, backend: str, control: Control, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist, self.device, self.name = dist, device, f"torch-{backend}"
        address = None
        if control.rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                address = f"tcp://{socket.gethostname()}:{s.getsockname()[1]}"
        address = control.allgather(address)[0]
        dist.init_process_group(backend, init_method=address, rank=control.rank, world_size=control.size)
        self.n, self.rank = control.size, control.rank

    def close(self) -> None:
        self.dist.destroy_process_group()

    def prepare(self, op: str, dtype: str, count: int) -> Callable[[], np.ndarray]:
        dist, n, r = self.dist, self.n, self.rank
        # torch 2.13 renamed the flat-tensor collectives (*_single); older releases have *_tensor.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        t = lambda a: torch.from_numpy(a).to(self.device, TORCH_DTYPES[dtype])  # noqa: E731
        send_count = count // n if op == "allgather" else count
        send = t(rep.inputs_for(op, r, n, send_count))
        out = lambda x: x.float().cpu().numpy()  # noqa: E731
        if op == "allreduce":  # in place; checked on the first call
            buf = send.clone()
            return lambda: (dist.all_reduce(buf), out(buf))[1]
        if op == "allgather":
            recv = torch.empty(send_count * n, dtype=send.dtype, device=self.device)
            return lambda: (all_gather(recv, send), out(recv))[1]
        if op == "broadcast":
            buf = send.clone()
            return lambda: (dist.broadcast(buf, src=0), out(buf))[1]
        if op == "reducescatter":
            recv = torch.empty(count // n, dtype=send.dtype, device=self.device)
            return lambda: (reduce_scatter(recv, send), out(recv))[1]
        if op == "alltoall":
            recv = torch.empty_like(send)
            return lambda: (dist.all_to_all_single(recv, send), out(recv))[1]
        if op == "sendrecv":
            recv = torch.empty_like(send)

            def exchange():
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (r + 1) % n),
                                               dist.P2POp(dist.irecv, recv, (r - 1) % n)])
                for req in reqs:
                    req.wait()
                return out(recv)

            return exchange
        raise NotImplementedError(op)


class HorovodBackend:
    def __init__(self, name: str, hvd, device: torch.device) -> None:
        self.name, self.hvd, self.device = name, hvd, device
        self.n, self.rank = hvd.size(), hvd.rank()

    def prepare(self, op: str, dtype: str, count: int) -> Callable[[], np.ndarray]:
        hvd, n, r = self.hvd, self.n, self.rank
        if op == "sendrecv":
            raise NotImplementedError("Horovod has no point-to-point operations")
        send_count = count // n if op == "allgather" else count
        send = torch.from_numpy(rep.inputs_for(op, r, n, send_count)).to(self.device, TORCH_DTYPES[dtype])
        out = lambda x: x.float().cpu().numpy()  # noqa: E731
        tag = f"{op}.{dtype}.{count}"
        if op == "allreduce":  # in place, as DistributedOptimizer reduces gradients
            return lambda: out(hvd.allreduce_(send, op=hvd.Sum, name=tag))
        if op == "allgather":
            return lambda: out(hvd.allgather(send, name=tag))
        if op == "broadcast":
            return lambda: out(hvd.broadcast(send, root_rank=0, name=tag))
        if op == "reducescatter":
            return lambda: out(hvd.reducescatter(send, op=hvd.Sum, name=tag))
        if op == "alltoall":
            return lambda: out(hvd.alltoall(send, name=tag))
        raise NotImplementedError(op)
