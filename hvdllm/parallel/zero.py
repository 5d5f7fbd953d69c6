"""ZeRO stages 1 and 2 over a data group (Rajbhandari et al. 2020), as an update rule.

Each replica of a model part (its data group: the whole world, or the ranks holding one
pipeline stage / tensor slice) owns a share of the part's parameters, and keeps optimizer
state only for those:

- ``parallel.zero = 1``: gradients are all-reduced as in plain data parallelism (Horovod's
  DistributedOptimizer, overlapped with backward); each rank steps the parameters it owns;
  the updated parameters are all-gathered (Horovod allgather on the group's process set).
- ``parallel.zero = 2``: the gradients are reduce-scattered instead (Horovod reducescatter),
  bucket by bucket as backward produces them (``parallel.zero_bucket_mb``, the last layers'
  first): each bucket is sent as soon as the last backward pass of the step has filled it, and
  its gradients are dropped then, so each rank keeps only its own parameters' averaged
  gradients; the global norm for clipping and the non-finite skip add every rank's share.

Ownership is by whole tensors, not by slices of one flat buffer (DeepSpeed, Megatron's
distributed optimizer): LAMB's trust ratio and Adafactor's factored moments are statistics of
whole tensors, and a rank owning whole tensors computes them as one rank would, with no
extra reductions; the cost is balance: the tensors are dealt largest first to the least
loaded rank, so a rank holds at most 1/d of the parameters plus its largest tensor. Within a
bucket the ranks' shares differ, and a reduce-scatter pads them to the longest: a bucket whose
padding would send more than an all-reduce of it is all-reduced instead, so zero 2 never
sends more than zero 0.

A checkpoint holds the whole optimizer state, gathered from the owners when it is written:
it is the same file as without ZeRO, so it resumes with any ``parallel.zero`` and data degree.
"""

from __future__ import annotations

import torch
from torch import nn

from hvdllm.comm.groups import HorovodReduction
from hvdllm.parallel.update import AllreduceUpdate


def bucket_parameters(sizes: list[int], element_bytes: int, bucket_bytes: float) -> list[list[int]]:
    """The indices of tensors of ``sizes`` elements in buckets of at least ``bucket_bytes``
    (the last one: what is left), from the last tensor to the first: backward's order."""
    buckets, current, filled = [], [], 0
    for index in reversed(range(len(sizes))):
        current.append(index)
        filled += sizes[index] * element_bytes
        if filled >= bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
    return buckets + ([current] if current else [])


def assign_owners(sizes: list[int], ranks: int, pinned: dict[int, int] | None = None) -> list[int]:
    """The rank owning each of the tensors of ``sizes`` elements: the largest first, each to
    the least loaded rank (the lowest on ties); ``pinned`` (index -> rank) are placed first."""
    pinned = pinned or {}
    owners, loads = [0] * len(sizes), [0] * ranks
    for index, rank in pinned.items():
        owners[index] = rank
        loads[rank] += sizes[index]
    for index in sorted((i for i in range(len(sizes)) if i not in pinned), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += sizes[index]
    return owners


class ShardedUpdate(AllreduceUpdate):
    gathers_optimizer_state = True

    def __init__(self, parallel_cfg, hvd, data_group, backward_passes_per_step: int) -> None:
        super().__init__(parallel_cfg, hvd, data_group, backward_passes_per_step)
        self.stage = parallel_cfg.zero
        self.collectives = HorovodReduction(data_group, hvd)
        self.bucket_bytes = parallel_cfg.zero_bucket_mb * 2**20
        self.gradient_bytes = 0  # those this rank held in the last step

    @property
    def shards_gradients(self) -> bool:
        return self.stage == 2

    def wrap_optimizer(self, optimizer, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        size, rank = self.data_group.size, self.data_group.rank
        # A tied embedding's copies on the first and last pipeline stages (both marked) add their
        # gradients between the stages' ranks of one data index: both belong to data rank 0.
        tied = {i: 0 for i, p in enumerate(self.params) if getattr(p, "tied_embedding", False)}
        owners = assign_owners([p.numel() for p in self.params], size, tied)
        element_bytes = torch.promote_types(self.params[0].dtype, torch.float32).itemsize
        self.buckets = [_Bucket([[self.params[i] for i in indices if owners[i] == r] for r in range(size)],
                                name=f"zero-bucket-{number}")
                        for number, indices in enumerate(bucket_parameters([p.numel() for p in self.params],
                                                                           element_bytes, self.bucket_bytes))]
        self.by_rank = [[p for bucket in self.buckets for p in bucket.by_rank[r]] for r in range(size)]
        self.mine = self.by_rank[rank]
        if self.stage == 1:
            return super().wrap_optimizer(optimizer, model)  # the all-reduce overlaps backward
        self.wrapped = False
        if size > 1:
            for bucket in self.buckets:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(self._on_gradient(bucket))
        return optimizer

    # --- gradients ------------------------------------------------------------------------------
    def _on_gradient(self, bucket: "_Bucket"):
        """A hook for each parameter of ``bucket``: once the step's last backward pass has
        given every one of them its gradient, the bucket is sent."""
        def hook(param: torch.Tensor) -> None:
            bucket.ready += 1
            if bucket.ready == len(bucket.params) * self.backward_passes_per_step:
                self._send(bucket)
        return hook

    def _send(self, bucket: "_Bucket") -> None:
        """Start the bucket's reduction (collective in the data group, matched by the bucket's
        name) and drop its gradients; take the shares of the buckets whose reduction has
        finished, so that only the buckets in flight hold a buffer."""
        size = self.data_group.size
        first = bucket.params[0]
        flat = torch.zeros(bucket.flat_length, dtype=torch.promote_types(first.dtype, torch.float32),
                           device=first.device)
        for rank, params in enumerate(bucket.by_rank):
            offset = bucket.offset(rank)
            for p in params:
                if p.grad is not None:
                    flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
                offset += p.numel()
        bucket.handle = self.collectives.reduce_async(flat, scale=1 / size, key=bucket.name,
                                                      scatter=bucket.scatters)
        for earlier in self.buckets:
            if earlier is not bucket and earlier.handle is not None and self.collectives.done(earlier.handle):
                self._take(earlier)

    def _take(self, bucket: "_Bucket") -> None:
        """Wait for the bucket's reduction; this rank's parameters of it get their averaged gradients."""
        rank = self.data_group.rank
        averaged = self.collectives.synchronize(bucket.handle)
        offset = 0 if bucket.scatters else bucket.offset(rank)
        for p in bucket.by_rank[rank]:
            p.grad = averaged[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        bucket.handle = None

    def reduce_gradients(self, optimizer) -> None:
        if self.stage == 1:
            super().reduce_gradients(optimizer)
        elif self.data_group.size > 1:
            self._finish_reduce_scatter()

    def _finish_reduce_scatter(self) -> None:
        """Collective in the data group: a bucket not sent yet (a parameter that had no
        gradient in some pass) goes now; then each rank takes the average of its own
        parameters' gradients from the buckets still in flight, and holds no other."""
        for bucket in self.buckets:
            if bucket.ready < len(bucket.params) * self.backward_passes_per_step:
                self._send(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                self._take(bucket)
            bucket.ready = 0

    def sum_squares(self, squares: float) -> float:
        """ZeRO-2: each rank holds its own parameters' gradients; their squares add up over the group."""
        return self.collectives.sum(squares) if self.stage == 2 else squares

    # --- the step ---------------------------------------------------------------------------------
    def step(self, optimizer, scaler) -> None:
        mine = {id(p) for p in self.mine}
        for p in self.params:
            if id(p) not in mine:
                p.grad = None  # the optimizer skips it: no state, no update (its owner's comes below)
        self.gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        super().step(optimizer, scaler)
        self._gather_parameters()

    def _gather_parameters(self) -> None:
        """Collective in the data group: each owner's updated parameters on every rank."""
        if self.data_group.size == 1:
            return
        first = self.params[0]
        mine = [p.detach().reshape(-1) for p in self.mine]
        flat = torch.cat(mine) if mine else first.new_empty(0)
        everyone = self.collectives.all_gather(flat)
        offset = 0
        with torch.no_grad():
            for params in self.by_rank:
                for p in params:
                    p.copy_(everyone[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def step_metrics(self) -> dict:
        return {"gradient_bytes": self.gradient_bytes}

    def banner_notes(self) -> list[str]:
        owned, total = sum(p.numel() for p in self.mine), sum(p.numel() for p in self.params)
        what = "optimizer state and gradients" if self.stage == 2 else "optimizer state"
        return [f"zero         stage {self.stage} over data {self.data_group.size}: this rank keeps the {what} of "
                f"{owned:,} of {total:,} parameters ({len(self.mine)} of {len(self.params)} tensors)"]

    # --- checkpoints --------------------------------------------------------------------------------
    def full_optimizer_state(self, optimizer) -> dict:
        """Collective in the data group: the whole optimizer state, each entry from its owner."""
        state = optimizer.state_dict()
        merged = {}
        for part in self.collectives.all_gather_state(state["state"]):
            merged.update(part)
        return {**state, "state": dict(sorted(merged.items()))}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """A whole optimizer state (from any ZeRO stage or none): this rank keeps its own share."""
        optimizer.load_state_dict(state)
        mine = {id(p) for p in self.mine}
        for p in self.params:
            if id(p) not in mine:
                optimizer.state.pop(p, None)


class _Bucket:
    """Parameters whose gradients are reduced together, by owner: ``by_rank[r]`` are rank r's,
    laid out rank by rank in one flat buffer. A reduce-scatter pads every rank's share to the
    longest; where that would send more than an all-reduce of the bucket (a tensor too large
    for its bucket to be shared out evenly: an embedding), the bucket is all-reduced instead
    and each rank keeps its own share of the sum."""

    def __init__(self, by_rank: list[list[nn.Parameter]], name: str) -> None:
        self.by_rank, self.name = by_rank, name  # the name matches its reduction on every data rank
        self.params = [p for params in by_rank for p in params]
        self.shares = [sum(p.numel() for p in params) for params in by_rank]
        ranks, total = len(by_rank), sum(self.shares)
        # A ring reduce-scatter sends (d - 1) / d of its padded buffer, an all-reduce twice that of its own.
        self.scatters = ranks * max(self.shares) <= 2 * total
        self.flat_length = ranks * max(self.shares) if self.scatters else total
        self.ready = 0  # gradients accumulated in this step's backward passes
        self.handle = None  # the reduction in flight

    def offset(self, rank: int) -> int:
        """Where rank ``rank``'s share starts in the flat buffer."""
        return rank * max(self.shares) if self.scatters else sum(self.shares[:rank])
