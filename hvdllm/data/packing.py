"""Packing: a split's global token stream cut into rows and shards that do not depend on the
number of ranks.

The global stream is the ranks' streams in rank order (each is its documents, each followed
by EOS). Row i is tokens [i R, (i + 1) R) (R = seq_len + 1; the tail short of a row is dropped)
and shard k is rows [k S, (k + 1) S) (S = samples per shard), so ``train-00003.h5`` holds the
same rows whatever the number of ranks. The rank whose stream holds a shard's first token
writes it; the tokens of the shard that lie on later ranks (the heads of their streams, at
most one shard's worth) are sent to it first. A rank reads its own stream from its chunk files
one shard at a time, so memory is bounded by the shard size, not the corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


class Stream:
    """A rank's token (or loss-mask) stream for one split: its chunks' files, in order."""

    def __init__(self, files: list[tuple[Path, int]], dtype: np.dtype) -> None:
        self.files = [(path, length) for path, length in files if length]
        self.dtype = np.dtype(dtype)
        self.length = sum(length for _, length in self.files)

    def read(self, first: int, count: int) -> np.ndarray:
        """Tokens [first, first + count) of this stream."""
        parts, offset = [], 0
        for path, length in self.files:
            begin, end = max(first, offset), min(first + count, offset + length)
            if begin < end:
                parts.append(np.fromfile(path, dtype=self.dtype, count=end - begin,
                                         offset=(begin - offset) * self.dtype.itemsize))
            offset += length
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


class ShardPlan:
    """Which shards this rank writes, and what it owes to the writers of earlier shards."""

    def __init__(self, comm, length: int, row: int, samples_per_shard: int) -> None:
        lengths = comm.allgather(length)
        self.starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        self.start, self.end = int(self.starts[comm.rank]), int(self.starts[comm.rank + 1])
        self.rows = int(self.starts[-1]) // row
        self.usable = self.rows * row  # tokens past it are the dropped tail
        self.shard_tokens = samples_per_shard * row
        end = min(self.end, self.usable)
        self.first_shard = -(-self.start // self.shard_tokens)
        first_boundary = self.first_shard * self.shard_tokens
        self.shards = range(self.first_shard, -(-end // self.shard_tokens) if end > first_boundary else self.first_shard)
        # Tokens before this rank's first shard boundary finish a shard begun on an earlier rank.
        self.head = (0, max(0, min(end, first_boundary) - self.start))

    def head_writer(self) -> int:
        """The rank that writes the shard this rank's head belongs to."""
        shard_start = (self.start // self.shard_tokens) * self.shard_tokens
        return int(np.searchsorted(self.starts[1:], shard_start, side="right"))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global token range of a shard."""
        return shard * self.shard_tokens, min((shard + 1) * self.shard_tokens, self.usable)


def exchange_heads(comm, plan: ShardPlan, streams: list[Stream]) -> list[np.ndarray]:
    """Send each stream's head to its writer; returns, per stream, the tokens that follow this
    rank's own part of its last shard (the heads of later ranks, in rank order)."""
    outgoing: list = [None] * comm.size
    if plan.head[1]:
        outgoing[plan.head_writer()] = [s.read(*plan.head) for s in streams]
    received = comm.alltoall(outgoing)
    tails = []
    for i, stream in enumerate(streams):
        parts = [heads[i] for heads in received if heads is not None]
        tails.append(np.concatenate(parts) if parts else np.zeros(0, dtype=stream.dtype))
    return tails


def write_shards(plan: ShardPlan, streams: list[Stream], tails: list[np.ndarray], row: int,
                 write: Callable[[int, list[np.ndarray]], None]) -> None:
    """Call ``write(shard, [rows of each stream])`` for each shard this rank writes."""
    for shard in plan.shards:
        begin, end = plan.shard_range(shard)
        own_end = min(end, plan.end)
        pieces = []
        for stream, tail in zip(streams, tails):
            tokens = stream.read(begin - plan.start, own_end - begin)
            if end > own_end:  # the shard runs on into later ranks' heads
                tokens = np.concatenate([tokens, tail[:end - own_end]])
            pieces.append(tokens.reshape(-1, row))
        write(shard, pieces)
