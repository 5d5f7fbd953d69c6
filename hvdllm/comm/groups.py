"""The communicators of a job's groups of ranks, keyed by the grid axes they span.

Each group has both kinds of communicator, each for the traffic it suits (measured by
``hvdllm bench comm``: Horovod's background cycle costs ~0.5 ms per collective here, an
mpi4py message a microsecond; their bandwidth is alike):

- a Horovod process set, for the large, fusable, overlappable collectives (gradients);
- an mpi4py communicator of its own (split from COMM_WORLD, so its messages never match any
  other traffic), for point to point and small latency-bound collectives.

Horovod process sets can only be declared at ``hvd.init``, so every group a job will use is
given to :func:`hvdllm.comm.init` at once, by every rank, in the same order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch


@dataclass(frozen=True)
class Group:
    """One group of ranks as seen from a member."""

    ranks: tuple[int, ...]  # global ranks, in group order
    rank: int  # this process's position in the group
    process_set: Any  # horovod.torch ProcessSet (the global set when the group is the world); None without Horovod
    mpi: Any  # an mpi4py communicator of exactly these ranks; None where MPI does not span the job

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        """A member's position in the group."""
        return self.ranks.index(rank)

    def sum(self, value: float) -> float:
        """Collective: ``value`` summed over the members, on the group's MPI communicator (a
        latency-bound scalar: microseconds there, a Horovod cycle otherwise)."""
        return self.mpi.allreduce(value) if self.size > 1 else value

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Collective: ``tensor`` reduced (``sum`` or ``max``) over the members, in place, on the
        group's MPI communicator: the latency-bound collectives of tensor parallelism. A tensor
        numpy cannot hold (bf16, fp16) is reduced in fp32; a CUDA one is staged through host
        memory (CUDA-aware MPI cannot be assumed)."""
        if self.size == 1:
            return tensor
        from mpi4py import MPI

        exact = (tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)
                 and tensor.is_contiguous())
        host = tensor.detach() if exact else tensor.detach().to("cpu", torch.float32).contiguous()
        self.mpi.Allreduce(MPI.IN_PLACE, host.numpy(), op={"sum": MPI.SUM, "max": MPI.MAX}[op])
        if not exact:
            tensor.copy_(host)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective: the members' tensors (alike in shape) concatenated along dimension 0."""
        host = _host_fp32(tensor)
        out = torch.empty((self.size * host.shape[0], *host.shape[1:]), dtype=host.dtype)
        self.mpi.Allgather(host.numpy(), out.numpy())
        return out.to(tensor.device, tensor.dtype)

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective: the members' tensors summed, and this member's slice of dimension 0 (which
        the members divide) returned."""
        host = _host_fp32(tensor)
        out = torch.empty((host.shape[0] // self.size, *host.shape[1:]), dtype=host.dtype)
        self.mpi.Reduce_scatter_block(host.numpy(), out.numpy())
        return out.to(tensor.device, tensor.dtype)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, bf16 and fp16 widened to fp32 (what numpy holds and reduces exactly)."""
    return tensor.detach() if tensor.dtype in (torch.float32, torch.float64) else tensor.detach().float()


def _host_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor numpy can hold."""
    return _wide(tensor).to("cpu").contiguous()


class HorovodReduction:
    """A group's reductions through its Horovod process set instead of its MPI communicator
    (``parallel.tensor_backend = "horovod"``): the caller sleeps while Horovod's background
    thread reduces, instead of polling MPI itself. Every member issues them in the same order."""

    def __init__(self, group: Group, hvd) -> None:
        self.group, self.hvd = group, hvd
        self.rank, self.size = group.rank, group.size
        self._calls = 0

    def _name(self) -> str:
        """A name for the next collective, alike on every member. Horovod matches unnamed
        collectives by a count of this process's Horovod calls, which differs between the
        members when they differ in other groups' traffic (ZeRO owners reducing their own
        parameters' statistics over their tensor groups): the group's own count does not."""
        self._calls += 1
        return f"group.{self.group.process_set.process_set_id}.{self._calls}"

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """As :meth:`Group.allreduce_` (a bf16 or fp16 tensor is reduced in fp32)."""
        if self.size == 1:  # a group of one has no process set, and nothing to reduce
            return tensor
        reduced = self.hvd.allreduce(_wide(tensor), op=self.hvd.Sum if op == "sum" else self.hvd.Max,
                                     name=self._name(), process_set=self.group.process_set)
        return tensor.copy_(reduced)

    def sum(self, value: float) -> float:
        return self.allreduce_(torch.tensor([value], dtype=torch.float64)).item()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """As :meth:`Group.all_gather`, but the members' first dimensions may differ."""
        if self.size == 1:
            return tensor
        return self.hvd.allgather(_wide(tensor).contiguous(), name=self._name(),
                                  process_set=self.group.process_set).to(tensor.dtype)

    def all_gather_state(self, state: dict) -> list[dict]:
        """Collective: every member's ``state`` (tensors, numbers, strings; torch.save's format,
        read back with weights_only), in member order. Horovod's own allgather_object knows no
        process sets."""
        if self.size == 1:
            return [state]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        mine = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        lengths = self.hvd.allgather(torch.tensor([mine.numel()]), name=self._name(),
                                     process_set=self.group.process_set).tolist()
        everyone = self.hvd.allgather(mine, name=self._name(), process_set=self.group.process_set)
        return [torch.load(io.BytesIO(part.numpy().tobytes()), weights_only=True)
                for part in everyone.split(lengths)]

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """As :meth:`Group.reduce_scatter`."""
        if self.size == 1:
            return tensor
        return self.hvd.reducescatter(_wide(tensor).contiguous(), op=self.hvd.Sum, name=self._name(),
                                      process_set=self.group.process_set).to(tensor.dtype)

    def reduce_async(self, tensor: torch.Tensor, scale: float, key: str, scatter: bool):
        """Start a sum of ``tensor`` times ``scale`` over a group of two or more: all-reduced,
        or reduce-scattered (``scatter``: :meth:`synchronize` gives this member's part). Named by
        ``key``, which each member gives alike, so the members may start several in any order
        (backward's hooks)."""
        start = self.hvd.reducescatter_async if scatter else self.hvd.allreduce_async
        return start(_wide(tensor).contiguous(), op=self.hvd.Sum, postscale_factor=scale,
                     name=f"group.{self.group.process_set.process_set_id}.{key}", process_set=self.group.process_set)

    def done(self, handle) -> bool:
        """Whether a collective started here has finished (:meth:`synchronize` would not wait)."""
        return self.hvd.poll(handle)

    def synchronize(self, handle) -> torch.Tensor:
        return self.hvd.synchronize(handle)


class Groups:
    """This rank's group along each requested set of axes: ``groups.group(("data",))``."""

    def __init__(self, by_axes: dict[Hashable, Group]) -> None:
        self._by_axes = by_axes

    def group(self, axes: Hashable) -> Group:
        try:
            return self._by_axes[axes]
        except KeyError:
            raise KeyError(f"no group over {axes!r} was set up (have: {sorted(self._by_axes)})") from None


def process_sets_to_declare(world_size: int, named_groups: dict[Hashable, Sequence[Sequence[int]]]) -> list[list[int]]:
    """Every distinct group that needs a Horovod process set of its own: the world is
    Horovod's global set, and a group of one rank has nothing to reduce."""
    result: list[list[int]] = []
    for groups in named_groups.values():
        for ranks in groups:
            ranks = sorted(ranks)
            if 1 < len(ranks) < world_size and ranks not in result:
                result.append(ranks)
    return result


def my_groups(rank: int, named_groups: dict[Hashable, Sequence[Sequence[int]]]) -> dict[Hashable, tuple[int, ...]]:
    """The group of each axes set that ``rank`` belongs to."""
    mine = {}
    for axes, groups in named_groups.items():
        found = [tuple(g) for g in groups if rank in g]
        if len(found) != 1:
            raise ValueError(f"rank {rank} is in {len(found)} groups over {axes!r}; it must be in exactly one")
        mine[axes] = found[0]
    return mine
