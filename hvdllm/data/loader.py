"""Batches for one data-parallel rank, from the shards of one split.

Knows nothing about Horovod: it takes the (rank, size) of the data-parallel group.

Each epoch is a seeded permutation of every sample of every shard. Global batch ``b`` of an
epoch is positions ``[b * size * B, (b + 1) * size * B)`` of that permutation and rank ``r``
reads the ``r``-th slice of ``B`` of it, so ``size`` ranks at batch ``B`` see exactly what
one rank at batch ``size * B`` sees. The permutation is padded by wrapping around to a whole
number of global batches: every sample is read each epoch and every rank yields the same
number of batches (one extra batch on one rank would leave the others waiting forever in
an allreduce).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hvdllm.data import shards
from hvdllm.errors import UserError


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    loss_mask: torch.Tensor | None = None  # (B, T) float, 1 where the target is learned

    def rows(self, start: int, count: int) -> "Batch":
        """Samples ``[start, start + count)`` of this batch."""
        end = start + count
        return Batch(self.inputs[start:end], self.targets[start:end],
                     None if self.loss_mask is None else self.loss_mask[start:end])

    def __iter__(self):  # unpacks as (inputs, targets) or (inputs, targets, mask)
        yield self.inputs
        yield self.targets
        if self.loss_mask is not None:
            yield self.loss_mask


class ShardedSamples:
    """Every sample of one split, by global index, read in chunk-aligned blocks.

    A split that fits in ``cache_mb`` is read whole when opened (chunk by chunk) into one
    table, so a batch is a single fancy index. A larger one is read on demand in blocks of
    one HDF5 chunk of rows, kept in an LRU cache of ``cache_mb``: one chunk read per miss
    instead of one small read per row.
    """

    def __init__(self, folder: str | Path, split: str, verify_checksums: bool = False,
                 cache_mb: float = 512.0) -> None:
        self.folder = Path(folder)
        self.manifest = shards.read_manifest(self.folder)
        entries = [e for e in self.manifest["shards"] if e["split"] == split]
        if not entries:
            raise UserError(f"{self.folder}: the manifest lists no {split!r} shards")
        self.seq_len = self.manifest["seq_len"]
        self.vocab_size = self.manifest["vocab_size"]
        self.paths = [self.folder / e["file"] for e in entries]
        self.files = []
        for entry, path in zip(entries, self.paths):
            if verify_checksums and shards.file_sha256(path) != entry["sha256"]:
                raise UserError(f"{path}: sha256 does not match the manifest")
            f = shards.open_shard(path, self.manifest)
            if len(f["tokens"]) != entry["samples"]:
                raise UserError(f"{path}: {len(f['tokens'])} samples but the manifest says {entry['samples']}")
            self.files.append(f)
        self.has_mask = all("loss_mask" in f for f in self.files)
        counts = np.array([len(f["tokens"]) for f in self.files], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self.chunk_rows = [f["tokens"].chunks[0] if f["tokens"].chunks else max(1, len(f["tokens"]))
                           for f in self.files]
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_mb * 1e6
        self._table: np.ndarray | None = None
        self._mask_table: np.ndarray | None = None
        row_bytes = (self.seq_len + 1) * (self.files[0]["tokens"].dtype.itemsize + (1 if self.has_mask else 0))
        if len(self) * row_bytes <= self._cache_limit:
            self._load_whole_split()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _load_whole_split(self) -> None:
        blocks = [self._block(shard, b) for shard, f in enumerate(self.files)
                  for b in range(-(-len(f["tokens"]) // self.chunk_rows[shard]))]
        self._table = np.concatenate([tokens for tokens, _ in blocks]) if blocks else None
        if self.has_mask and blocks:
            self._mask_table = np.concatenate([mask for _, mask in blocks])
        self._cache.clear()
        self._cache_bytes = 0

    def close(self) -> None:
        for f in self.files:
            f.close()

    def _block(self, shard: int, block: int) -> tuple[np.ndarray, np.ndarray | None]:
        key = (shard, block)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        f, rows = self.files[shard], self.chunk_rows[shard]
        window = slice(block * rows, (block + 1) * rows)
        try:
            tokens = f["tokens"][window]
            mask = f["loss_mask"][window] if self.has_mask else None
        except OSError as err:
            raise UserError(f"{self.paths[shard]}: unreadable block (corrupt shard): {err}") from None
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise UserError(f"{self.paths[shard]}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")
        self._cache[key] = (tokens, mask)
        self._cache_bytes += tokens.nbytes + (mask.nbytes if mask is not None else 0)
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, (old_tokens, old_mask) = self._cache.popitem(last=False)
            self._cache_bytes -= old_tokens.nbytes + (old_mask.nbytes if old_mask is not None else 0)
        return tokens, mask

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows (n, seq_len + 1) as int64 (and the mask rows) for global sample indices.

        From the whole-split table when it is loaded; else one Python step per distinct
        block touched, not per row: the rows of a block are gathered with one fancy index.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if self._table is not None:
            mask = self._mask_table[indices] if self._mask_table is not None else None
            return self._table[indices].astype(np.int64), mask
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        local = indices - self.starts[shard_of]
        rows_per_block = np.asarray(self.chunk_rows, dtype=np.int64)[shard_of]
        block_of = local // rows_per_block
        tokens = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        mask = np.empty_like(tokens, dtype=np.uint8) if self.has_mask else None
        keys = shard_of * (1 << 32) + block_of
        for key in np.unique(keys):
            where = np.nonzero(keys == key)[0]
            shard, block = int(key >> 32), int(key & 0xFFFFFFFF)
            block_tokens, block_mask = self._block(shard, block)
            within = local[where] - block * self.chunk_rows[shard]
            tokens[where] = block_tokens[within]
            if mask is not None:
                mask[where] = block_mask[within]
        return tokens, mask


class DistributedBatches:
    """An endless, resumable stream of this rank's batches, read ahead by a thread.

    Args:
        samples: the split to read.
        rank, size: this rank's place in the data-parallel group.
        batch_size: samples per batch on this rank.
        seq_len: tokens per input row; 0 = the shards' seq_len (shorter rows are cut).
        random_offset: augmentation: each sample starts at a random offset into the packed
            stream (it runs on into the next sample of the same shard).
        prefetch: batches read ahead; 0 reads in the caller's thread.
    """

    def __init__(self, samples: ShardedSamples, rank: int, size: int, batch_size: int, seed: int,
                 shuffle: bool = True, seq_len: int = 0, random_offset: bool = False, prefetch: int = 4) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a group of {size}")
        if seq_len > samples.seq_len:
            raise UserError(f"data.seq_len {seq_len} is longer than the shards' seq_len {samples.seq_len} "
                            f"in {samples.folder}")
        self.samples, self.rank, self.size = samples, rank, size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.seq_len = seq_len or samples.seq_len
        self.random_offset, self.prefetch = random_offset, prefetch
        self.global_batch = size * batch_size
        self.batches_per_epoch = -(-len(samples) // self.global_batch)
        self.epoch, self.batch = 0, 0  # the next batch the caller will get
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- order -------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return np.resize(order, self.batches_per_epoch * self.global_batch)  # wrap-around pad

    def batch_indices(self, epoch: int, batch: int, order: np.ndarray | None = None) -> np.ndarray:
        order = self.epoch_order(epoch) if order is None else order
        start = batch * self.global_batch + self.rank * self.batch_size
        return order[start:start + self.batch_size]

    def _read(self, epoch: int, batch: int, order: np.ndarray) -> Batch:
        indices = self.batch_indices(epoch, batch, order)
        tokens, mask = self.samples.rows(indices)
        if self.random_offset:
            # Offsets for the whole global batch from one seed, so they do not depend on size.
            offsets = np.random.default_rng([self.seed, epoch, batch, 1]).integers(
                0, self.samples.seq_len + 1, size=self.global_batch)
            offsets = offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            tokens, mask = self._shift(indices, offsets, tokens, mask)
        tokens = torch.from_numpy(tokens[:, :self.seq_len + 1])
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss_mask = None
        if mask is not None:
            loss_mask = torch.from_numpy(mask[:, 1:self.seq_len + 1].astype(np.float32))
        return Batch(inputs.contiguous(), targets.contiguous(), loss_mask)

    def _shift(self, indices, offsets, tokens, mask):
        """Start each row ``offset`` tokens later, continuing into the next sample of its shard."""
        shard_of = np.searchsorted(self.samples.starts, indices, side="right") - 1
        has_next = indices + 1 < self.samples.starts[shard_of + 1]
        offsets = np.where(has_next, offsets, 0)
        next_tokens, next_mask = self.samples.rows(np.where(has_next, indices + 1, indices))
        joined = np.concatenate([tokens, next_tokens], axis=1)
        width = tokens.shape[1]
        cols = offsets[:, None] + np.arange(width)[None, :]
        shifted = np.take_along_axis(joined, cols, axis=1)
        if mask is not None:
            mask = np.take_along_axis(np.concatenate([mask, next_mask], axis=1), cols, axis=1)
        return shifted, mask

    # -- iteration ---------------------------------------------------------------------
    def _positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int]]:
        while not self._stop.is_set():
            yield epoch, batch
            batch += 1
            if batch == self.batches_per_epoch:
                epoch, batch = epoch + 1, 0

    def _produce(self, epoch: int, batch: int) -> Iterator[tuple[int, int, Batch]]:
        order_epoch, order = None, None
        for e, b in self._positions(epoch, batch):
            if e != order_epoch:
                order_epoch, order = e, self.epoch_order(e)
            yield e, b, self._read(e, b, order)

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        self._stop.clear()
        source = self._produce(self.epoch, self.batch)
        if self.prefetch:
            source = self._prefetched(source)
        for e, b, item in source:
            self.epoch, self.batch = (e, b + 1) if b + 1 < self.batches_per_epoch else (e + 1, 0)
            yield item

    def _prefetched(self, source):
        """Read ahead in a thread. Batches travel in groups of ``prefetch``: one queue hand-off
        (and one GIL hand-over, up to a 5 ms switch interval) per group, not per batch."""
        q: queue.Queue = queue.Queue(maxsize=2)

        def work() -> None:
            try:
                while not self._stop.is_set():
                    group = [item for _, item in zip(range(self.prefetch), source)]
                    if not group:
                        return
                    while not self._stop.is_set():
                        try:
                            q.put(group, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as err:  # handed to the consumer, which re-raises it
                q.put(err)

        self._thread = threading.Thread(target=work, name="hvdllm-prefetch", daemon=True)
        self._thread.start()
        while True:
            group = q.get()
            if isinstance(group, BaseException):
                raise group
            yield from group

    def close(self) -> None:
        """Stop the read-ahead thread (the position stays where the caller is)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
