"""Deduplication spread over the ranks: every hash is sent to the rank that owns it.

Documents are numbered in the global order (rank r's documents follow rank r - 1's), so "the
first" means the same whatever the number of ranks.

- Exact: each document's hash goes to the owner ``hash mod N`` (an all-to-all); the owner
  keeps the first document of each hash and sends the numbers of the others back.
- Near: for each LSH band in turn, each document's band key goes to the owner ``key mod N``;
  documents that share a key are candidate pairs (each paired with the first
  ``REPRESENTATIVES`` of its group, which bounds the pairs of a large group of boilerplate).
  A pair (i, j), i < j, is sent to j's rank, which fetches i's shingle set from i's rank and
  drops j when their exact Jaccard similarity is at least the threshold. So a document is
  dropped when it is near an earlier one, and the first of every group is kept.

  Verifying exactly rather than by the signatures' estimate: with 128 permutations the
  estimate's standard deviation near 0.8 is 0.035, so documents just below the threshold
  passed and ones just above failed; on planted near copies that cost precision against
  datasketch's MinHashLSH on 2 of 4 seeds. The shingle sets wait on disk, so it costs disk
  (about the text's size), not memory.

A rank holds its share of one band's keys at a time, the candidate pairs found so far (each
pair once), and, to verify, the shingle sets of its candidate documents and of their earlier
partners: only those travel.
"""

from __future__ import annotations

import numpy as np

from hvdllm.data.dedup import choose_bands
from hvdllm.data.scan import Sketches

REPRESENTATIVES = 16  # earlier documents of a band group a later one is compared with
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


class Numbering:
    """Global document numbers: rank r's local document i is ``starts[r] + i``."""

    def __init__(self, comm, local_documents: int) -> None:
        counts = comm.allgather(local_documents)
        self.starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.first = int(self.starts[comm.rank])
        self.count = local_documents

    def rank_of(self, numbers: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts[:-1], numbers, side="right") - 1

    def local(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.count, dtype=np.int64)


def exchange(comm, destination: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """Send row i of every column to rank ``destination[i]``; returns each column's received
    rows, those from rank 0 first, each sender's rows in the order it sent them."""
    order = np.argsort(destination, kind="stable")
    cuts = np.cumsum(np.bincount(destination, minlength=comm.size))[:-1]
    pieces = [np.split(column[order], cuts) for column in columns]
    received = comm.alltoall([[piece[r] for piece in pieces] for r in range(comm.size)])
    return [np.concatenate([parts[c] for parts in received]) for c in range(len(columns))]


def exact_duplicates(comm, hashes: np.ndarray, numbering: Numbering) -> np.ndarray:
    """(n,) bool: which of this rank's documents repeat an earlier document's hash."""
    words = np.ascontiguousarray(hashes).view("<u8").reshape(-1, 2)
    high, low, number = exchange(comm, (words[:, 0] % np.uint64(comm.size)).astype(np.int64),
                                 words[:, 0], words[:, 1], numbering.local())
    order = np.lexsort((number, low, high))
    high, low, number = high[order], low[order], number[order]
    repeats = number[1:][(high[1:] == high[:-1]) & (low[1:] == low[:-1])]
    return _flags(comm, repeats, numbering)


def near_duplicates(comm, sketches: Sketches, candidates: np.ndarray, numbering: Numbering,
                    threshold: float) -> np.ndarray:
    """(n,) bool: which of this rank's ``candidates`` (a mask) are near an earlier candidate."""
    bands, rows = choose_bands(sketches.num_perm, threshold)
    numbers = numbering.local()[candidates]
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(bands):
        keys = np.concatenate([_band_keys(block[:, band * rows:(band + 1) * rows], band)
                               for block in sketches.signature_blocks()] or [np.zeros(0, np.uint64)])[candidates]
        owner_keys, owner_numbers = exchange(comm, (keys % np.uint64(comm.size)).astype(np.int64), keys, numbers)
        pairs = [np.unique(np.concatenate([*pairs, _candidate_pairs(owner_keys, owner_numbers)]), axis=0)]
    pairs = pairs[0]
    earlier, later = exchange(comm, numbering.rank_of(pairs[:, 1]), pairs[:, 0], pairs[:, 1])
    similar = _jaccard(comm, sketches, numbering, earlier, later) >= threshold
    flags = np.zeros(numbering.count, dtype=bool)
    flags[later[similar] - numbering.first] = True
    return flags


def _flags(comm, numbers: np.ndarray, numbering: Numbering) -> np.ndarray:
    """Send document numbers back to their ranks; (n,) bool of this rank's that came back."""
    mine = exchange(comm, numbering.rank_of(numbers), numbers)[0]
    flags = np.zeros(numbering.count, dtype=bool)
    flags[mine - numbering.first] = True
    return flags


def _band_keys(band: np.ndarray, index: int) -> np.ndarray:
    """A 64-bit FNV-1a style hash of each row of one band, seeded by the band's index."""
    keys = np.full(len(band), _FNV_OFFSET ^ np.uint64(index), dtype=np.uint64)
    for column in band.T:
        keys = (keys ^ column.astype(np.uint64)) * _FNV_PRIME
    return keys


def _candidate_pairs(keys: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """(pairs, 2) of (earlier, later) numbers that share a key: each later member of a group
    with each of the group's first REPRESENTATIVES members."""
    order = np.lexsort((numbers, keys))
    keys, numbers = keys[order], numbers[order]
    starts_group = np.ones(len(keys), dtype=bool)
    starts_group[1:] = keys[1:] != keys[:-1]
    group_start = np.maximum.accumulate(np.where(starts_group, np.arange(len(keys)), 0))
    position = np.arange(len(keys)) - group_start
    pairs = [np.stack([numbers[group_start[position > t] + t], numbers[position > t]], axis=1)
             for t in range(REPRESENTATIVES)]
    return np.concatenate(pairs).astype(np.int64)


def _jaccard(comm, sketches: Sketches, numbering: Numbering, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """The Jaccard similarity of each pair's shingle sets; ``later`` are this rank's, the
    earlier documents' sets are fetched from their ranks."""
    wanted = np.unique(earlier)
    asked, asker = exchange(comm, numbering.rank_of(wanted), wanted, np.full(len(wanted), comm.rank))
    answers = sketches.shingle_sets(asked - numbering.first)
    outgoing: list = [([], []) for _ in range(comm.size)]
    for number, rank, shingles in zip(asked, asker, answers):
        outgoing[rank][0].append(number)
        outgoing[rank][1].append(shingles)
    theirs = {int(n): s for numbers, sets in comm.alltoall(outgoing) for n, s in zip(numbers, sets)}
    mine = np.unique(later)
    ours = dict(zip(mine.tolist(), sketches.shingle_sets(mine - numbering.first)))  # each document's set once
    similarity = np.zeros(len(later))
    for at, (i, j) in enumerate(zip(earlier.tolist(), later.tolist())):
        common = len(np.intersect1d(theirs[i], ours[j], assume_unique=True))
        similarity[at] = common / (len(theirs[i]) + len(ours[j]) - common)
    return similarity
