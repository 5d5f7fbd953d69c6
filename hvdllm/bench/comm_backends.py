"""The communication libraries under ``hvdllm bench comm``, behind one interface, and the
control plane that coordinates the ranks while they are measured.

Each backend's ``prepare(op, dtype, count)`` returns a :class:`Case` (the op, ready to run
and to check), or raises NotImplementedError with the reason.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hvdllm.bench import comm_report as rep

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    """One collective ready to be timed: ``run`` issues it and is the only thing timed;
    ``result`` copies what this rank holds afterwards to a numpy array, for checking outside
    the timed region; ``reset`` puts an in-place buffer back to its input first, so each
    call reduces the same finite values (summing one buffer over and over overflows fp16)."""

    run: Callable[[], object]
    result: Callable[[], np.ndarray]
    reset: Callable[[], object] = lambda: None


def _kept(call: Callable[[], object]) -> tuple[Callable[[], None], Callable[[], object]]:
    """For ops that return a new buffer: a run that keeps the output, and a getter for it."""
    box = {}
    return (lambda: box.__setitem__("out", call())), (lambda: box["out"])


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

    def prepare(self, op: str, dtype: str, count: int) -> Case:
        if dtype != "fp32":
            raise NotImplementedError("MPI has no standard fp16/bf16 reduction type")
        MPI, comm, n, r = self.MPI, self.comm, self.comm.size, self.comm.rank
        send_count = count // n if op == "allgather" else count
        send = rep.inputs_for(op, r, n, send_count).astype(np.float32)
        if op in ("allreduce", "broadcast"):  # in place, as a gradient allreduce is
            buf = send.copy()
            if op == "allreduce":
                return Case(lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), lambda: buf.copy(),
                            lambda: np.copyto(buf, send))
            return Case(lambda: comm.Bcast(buf, root=0), lambda: buf.copy(), lambda: np.copyto(buf, send))
        recv = np.empty(count // n if op == "reducescatter" else send_count * n if op == "allgather" else count,
                        dtype=np.float32)
        runs = {"allgather": lambda: comm.Allgather(send, recv),
                "reducescatter": lambda: comm.Reduce_scatter_block(send, recv, op=MPI.SUM),
                "alltoall": lambda: comm.Alltoall(send, recv),
                "sendrecv": lambda: comm.Sendrecv(send, dest=(r + 1) % n, recvbuf=recv, source=(r - 1) % n)}
        if op not in runs:
            raise NotImplementedError(op)
        return Case(runs[op], lambda: recv.copy())


def free_tcp_address() -> str:
    """A ``tcp://host:port`` init method for torch.distributed, on a port free here now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return f"tcp://{socket.gethostname()}:{s.getsockname()[1]}"


class TorchDistBackend:
    def __init__(self, backend: str, control: Control, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist, self.device, self.name = dist, device, f"torch-{backend}"
        address = control.allgather(free_tcp_address() if control.rank == 0 else None)[0]
        dist.init_process_group(backend, init_method=address, rank=control.rank, world_size=control.size)
        self.n, self.rank = control.size, control.rank

    def close(self) -> None:
        self.dist.destroy_process_group()

    def prepare(self, op: str, dtype: str, count: int) -> Case:
        dist, n, r = self.dist, self.n, self.rank
        # torch 2.13 renamed the flat-tensor collectives (*_single); older releases have *_tensor.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        t = lambda a: torch.from_numpy(a).to(self.device, TORCH_DTYPES[dtype])  # noqa: E731
        send_count = count // n if op == "allgather" else count
        send = t(rep.inputs_for(op, r, n, send_count))
        out = lambda x: x.float().cpu().numpy()  # noqa: E731
        if op in ("allreduce", "broadcast"):  # in place, as a gradient allreduce is
            buf = send.clone()
            run = (lambda: dist.all_reduce(buf)) if op == "allreduce" else (lambda: dist.broadcast(buf, src=0))
            return Case(run, lambda: out(buf), lambda: buf.copy_(send))
        size = count // n if op == "reducescatter" else send_count * n if op == "allgather" else count
        recv = torch.empty(size, dtype=send.dtype, device=self.device)

        def exchange():
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (r + 1) % n),
                                           dist.P2POp(dist.irecv, recv, (r - 1) % n)])
            for req in reqs:
                req.wait()

        runs = {"allgather": lambda: all_gather(recv, send), "reducescatter": lambda: reduce_scatter(recv, send),
                "alltoall": lambda: dist.all_to_all_single(recv, send), "sendrecv": exchange}
        if op not in runs:
            raise NotImplementedError(op)
        return Case(runs[op], lambda: out(recv))


class HorovodBackend:
    def __init__(self, name: str, hvd, device: torch.device) -> None:
        self.name, self.hvd, self.device = name, hvd, device
        self.n, self.rank = hvd.size(), hvd.rank()

    def prepare(self, op: str, dtype: str, count: int) -> Case:
        hvd, n, r = self.hvd, self.n, self.rank
        if op == "sendrecv":
            raise NotImplementedError("Horovod has no point-to-point operations")
        send_count = count // n if op == "allgather" else count
        send = torch.from_numpy(rep.inputs_for(op, r, n, send_count)).to(self.device, TORCH_DTYPES[dtype])
        out = lambda x: x.float().cpu().numpy()  # noqa: E731
        tag = f"{op}.{dtype}.{count}"
        if op == "allreduce":  # in place, as DistributedOptimizer reduces gradients
            buf = send.clone()
            return Case(lambda: hvd.allreduce_(buf, op=hvd.Sum, name=tag), lambda: out(buf), lambda: buf.copy_(send))
        calls = {"allgather": lambda: hvd.allgather(send, name=tag),
                 "broadcast": lambda: hvd.broadcast(send, root_rank=0, name=tag),
                 "reducescatter": lambda: hvd.reducescatter(send, op=hvd.Sum, name=tag),
                 "alltoall": lambda: hvd.alltoall(send, name=tag)}
        if op not in calls:
            raise NotImplementedError(op)
        run, output = _kept(calls[op])
        return Case(run, lambda: out(output()))
