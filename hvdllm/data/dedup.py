"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH banding).

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' sets of word
n-gram shingles as the share of equal entries in their signatures. LSH banding (Leskovec et
al., Mining of Massive Datasets, ch. 3.4) cuts each signature into b bands of r rows; two
documents become candidates when any band is identical, with probability 1 - (1 - J^r)^b.
Candidates are then confirmed by the signature estimate, so the threshold holds as asked.
Hashes are crc32 and a fixed-seed universal hash family, so results do not depend on the
process (Python's own hash() is salted per process).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

_PRIME = np.uint64((1 << 31) - 1)  # Mersenne prime; products of two values below it fit in 64 bits
_WORD = re.compile(r"\w+")


def exact_hash(text: str) -> bytes:
    """Hash of the text with whitespace collapsed and case folded: equal for exact duplicates
    that differ only in layout."""
    normalized = " ".join(text.split()).casefold()
    return hashlib.blake2b(normalized.encode(), digest_size=16).digest()


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams of ``text`` (one hash for texts shorter than n words)."""
    words = np.fromiter((zlib.crc32(w.encode()) for w in _WORD.findall(text.casefold())), dtype=np.uint64)
    if len(words) == 0:
        return np.zeros(1, dtype=np.uint64)
    if len(words) < n:
        n = len(words)
    # Polynomial combination of n consecutive word hashes, kept to 32 bits.
    combined = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for i in range(n):
        combined = (combined * np.uint64(1_000_003) + words[i:len(words) - n + 1 + i]) & np.uint64(0xFFFFFFFF)
    return np.unique(combined)


@dataclass(frozen=True)
class MinHasher:
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1

    @cached_property
    def _family(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of the hash family, (num_perm, 1) each, drawn once from the seed."""
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, _PRIME, size=self.num_perm, dtype=np.uint64)
        b = rng.integers(0, _PRIME, size=self.num_perm, dtype=np.uint64)
        return a[:, None], b[:, None]

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) minima of the hash family h(x) = (a x + b) mod p over the shingles."""
        a, b = self._family
        x = shingle_hashes(text, self.shingle) % _PRIME
        # a, x < 2^31, so a x + b stays inside 64 bits.  (num_perm, shingles) -> (num_perm,)
        return ((a * x[None, :] + b) % _PRIME).min(axis=1).astype(np.uint32)


def choose_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands * rows = num_perm that minimize the weighted areas of false
    positives and false negatives of the candidate step around ``threshold`` (as datasketch
    does). Candidates are verified afterwards, so a false positive costs only time and a
    false negative is weighted 9 times more."""
    grid = np.linspace(0.0, 1.0, 201)
    best, best_cost = (num_perm, 1), np.inf
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        p = 1 - (1 - grid**rows) ** bands
        false_pos = np.trapezoid(np.where(grid < threshold, p, 0.0), grid)
        false_neg = np.trapezoid(np.where(grid >= threshold, 1 - p, 0.0), grid)
        cost = 0.1 * false_pos + 0.9 * false_neg
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best
