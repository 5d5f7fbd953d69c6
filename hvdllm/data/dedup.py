"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH banding).

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' sets of word
n-gram shingles as the share of equal entries in their signatures. LSH banding (Leskovec et
al., Mining of Massive Datasets, ch. 3.4) cuts each signature into b bands of r rows; two
documents become candidates when any band is identical, with probability 1 - (1 - J^r)^b.
Candidates are then confirmed by their exact Jaccard similarity (of the shingle hashes), so
the threshold holds as asked.

Signatures are one-permutation MinHash with optimal densification (Li et al. 2012;
Shrivastava 2017): each shingle is hashed once, into one of num_perm bins, and a bin keeps
its smallest value; an empty bin takes the value of a bin chosen by a fixed hash chain. Each
entry still collides with probability J, for one hash per shingle instead of num_perm, which
is what lets deduplication keep up with the tokenizer on the same cores.
Hashes are a polynomial hash of the words' bytes and fixed-seed mixers, so results do not
depend on the process (Python's own hash() is salted per process).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
    powers, inverse_powers = _powers(len(data))
    with np.errstate(over="ignore"):
        prefix = np.concatenate((np.zeros(1, np.uint64),
                                 np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers, dtype=np.uint64)))
        return (prefix[ends] - prefix[starts]) * inverse_powers[starts]


_powers_cache = (np.ones(1, np.uint64), np.ones(1, np.uint64))


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^i, B^-i) for i < n (mod 2^64), kept between calls and grown by doubling: computing
    them per document cost more than the hash itself."""
    global _powers_cache
    if len(_powers_cache[0]) < n:
        size = max(n, 2 * len(_powers_cache[0]))
        with np.errstate(over="ignore"):
            _powers_cache = (np.cumprod(np.full(size, _BASE, dtype=np.uint64)) * _BASE_INVERSE,
                             np.cumprod(np.full(size, _BASE_INVERSE, dtype=np.uint64)) * _BASE)
    return _powers_cache[0][:n], _powers_cache[1][:n]


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


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele et al. 2014): a bijection of uint64 whose every output
    bit depends on every input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_LOW32 = np.uint64(0xFFFFFFFF)
_EMPTY = np.uint64(1 << 32)  # above every 32-bit value a bin can hold


@dataclass(frozen=True)
class MinHasher:
    """One-permutation MinHash signatures of ``num_perm`` bins, computed for many documents at
    once (the module docstring says why and how)."""
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1

    def _in_range(self, hashes: np.ndarray) -> np.ndarray:
        """Map uint64 hashes to bins 0..num_perm-1 by their top 32 bits (Lemire's reduction)."""
        return (((hashes >> np.uint64(32)) * np.uint64(self.num_perm)) >> np.uint64(32)).astype(np.int64)

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """(documents, num_perm) uint32: each document's signature, from its shingle hashes
        (every set non-empty)."""
        k = self.num_perm
        lengths = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
        hashes = _mix(np.concatenate(shingle_sets) ^ np.uint64(self.seed)) if len(shingle_sets) else \
            np.zeros(0, np.uint64)
        slots = np.repeat(np.arange(len(shingle_sets)) * k, lengths) + self._in_range(hashes)
        bins = np.full(len(shingle_sets) * k, _EMPTY, dtype=np.uint64)
        np.minimum.at(bins, slots, hashes & _LOW32)  # the low 32 bits: independent of the bin's
        bins = bins.reshape(len(shingle_sets), k)
        return self._densified(bins).astype(np.uint32)

    def _densified(self, bins: np.ndarray) -> np.ndarray:
        """Fill each empty bin j with the value of the first non-empty bin among
        choice(j, 1), choice(j, 2), ..., a chain that is the same for every document, so two
        documents' entries still collide with probability J."""
        filled = bins.copy()
        docs, empty = np.nonzero(bins == _EMPTY)
        attempt = np.uint64(0)
        while len(docs):
            attempt += np.uint64(1)
            with np.errstate(over="ignore"):
                chosen = self._in_range(_mix(empty.astype(np.uint64) + attempt * np.uint64(self.num_perm)
                                             + np.uint64(self.seed) * np.uint64(0x9E3779B97F4A7C15)))
            values = bins[docs, chosen]
            found = values != _EMPTY
            filled[docs[found], empty[found]] = values[found]
            docs, empty = docs[~found], empty[~found]
        return filled


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
