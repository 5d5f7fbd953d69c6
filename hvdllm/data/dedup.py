"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH banding).

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' sets of word
n-gram shingles as the share of equal entries in their signatures. LSH banding (Leskovec et
al., Mining of Massive Datasets, ch. 3.4) cuts each signature into b bands of r rows; two
documents become candidates when any band is identical, with probability 1 - (1 - J^r)^b.
Candidates are then confirmed by their exact Jaccard similarity (of the shingle hashes), so
the threshold holds as asked.
Hashes are a polynomial hash of the words' bytes and a fixed-seed multiply-shift family, so
results do not depend on the process (Python's own hash() is salted per process).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Bytes that make up words: ASCII letters, digits and "_" (as regex \w), and every byte of a
# non-ASCII character (so accented and non-Latin words stay whole; non-ASCII punctuation counts
# as a letter, which costs nothing when comparing two documents the same way).
_WORD_BYTE = np.zeros(256, dtype=bool)
for _chars in (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", bytes(range(128, 256))):
    _WORD_BYTE[np.frombuffer(_chars, dtype=np.uint8)] = True
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
_BASE_INVERSE = np.uint64(pow(int(_BASE), -1, 1 << 64))
_SHINGLE_BASE = np.uint64(1_000_003)
_SHINGLES_AT_ONCE = 1 << 14  # (num_perm, this) uint64 temporaries: 16 MB at 128 permutations


def exact_hash(text: str) -> bytes:
    """Hash of the text with whitespace collapsed and case folded: equal for exact duplicates
    that differ only in layout."""
    normalized = " ".join(text.split()).casefold()
    return hashlib.blake2b(normalized.encode(), digest_size=16).digest()


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of each word of the case-folded text, in order, computed on whole arrays:
    a polynomial hash of the bytes, H[k] = sum over i < k of (byte_i + 1) B^i (mod 2^64), so a
    word's hash is (H[end] - H[start]) B^-start."""
    data = np.frombuffer(text.casefold().encode(), dtype=np.uint8)
    in_word = np.concatenate(([False], _WORD_BYTE[data], [False]))
    edges = np.flatnonzero(in_word[1:] != in_word[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(len(data), _BASE, dtype=np.uint64)) * _BASE_INVERSE  # B^i
        prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers, dtype=np.uint64)))
        inverse_powers = np.cumprod(np.full(len(data), _BASE_INVERSE, dtype=np.uint64)) * _BASE  # B^-i
        return (prefix[ends] - prefix[starts]) * inverse_powers[starts]


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """The distinct 64-bit hashes of the word n-grams of ``text`` (one for texts shorter than n
    words)."""
    words = word_hashes(text)
    if len(words) == 0:
        return np.zeros(1, dtype=np.uint64)
    n = min(n, len(words))
    combined = np.zeros(len(words) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):  # a polynomial of n consecutive word hashes
            combined = combined * _SHINGLE_BASE + words[i:len(words) - n + 1 + i]
    return np.unique(combined)


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures with the multiply-shift family h(x) = (a x + b) >> 32 (mod 2^64, a odd;
    Dietzfelbinger et al. 1997): universal enough for MinHash and, with no division, several
    times faster in numpy than (a x + b) mod p."""
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1

    @cached_property
    def _family(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) of the hash family, (num_perm, 1) each, drawn once from the seed."""
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 1 << 63, size=self.num_perm, dtype=np.uint64)
        return a[:, None], b[:, None]

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """(num_perm,) uint32 minima of the hash family over a text's shingle hashes."""
        a, b = self._family
        minima = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for first in range(0, len(shingles), _SHINGLES_AT_ONCE):  # a huge document in bounded blocks
                x = shingles[None, first:first + _SHINGLES_AT_ONCE]
                np.minimum(minima, ((a * x + b) >> np.uint64(32)).min(axis=1), out=minima)
        return minima.astype(np.uint32)


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
