"""Point-to-point tensors over an mpi4py communicator (pipeline activations and gradients).

Horovod has no point-to-point operation, so tensors travel over a communicator of their own
(the pipeline group's, split from COMM_WORLD, so they can never match any other traffic).
They go as raw bytes of contiguous CPU buffers (never pickled); a CUDA tensor is staged
through host memory, as CUDA-aware MPI cannot be assumed. A torch.distributed transport
(NCCL on GPUs) can stand behind the same three methods.

Sends are non-blocking (the buffer is kept alive until :meth:`wait_sends`), receives block:
the schedules are built so that this never deadlocks (``hvdllm.parallel.schedules.simulate``).
Peers are ranks of the communicator given.
"""

from __future__ import annotations

import time

import torch


class MpiTransport:
    def __init__(self, comm) -> None:
        from mpi4py import MPI

        self._byte = MPI.BYTE
        self._waitall = MPI.Request.Waitall
        self.comm = comm
        self._pending: list = []  # (request, buffer): a buffer must outlive its send
        self.waiting_s = 0.0  # time blocked in receives and send completions: the pipeline's idle time

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        buffer = tensor.detach().to("cpu").contiguous()
        request = self.comm.Isend([buffer.view(torch.uint8).numpy(), self._byte], dest=dst, tag=tag)
        self._pending.append((request, buffer))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int,
             device: torch.device) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        start = time.perf_counter()
        self.comm.Recv([buffer.view(torch.uint8).numpy(), self._byte], source=src, tag=tag)
        self.waiting_s += time.perf_counter() - start
        return buffer.to(device)

    def wait_sends(self) -> None:
        start = time.perf_counter()
        self._waitall([request for request, _ in self._pending])
        self.waiting_s += time.perf_counter() - start
        self._pending.clear()
