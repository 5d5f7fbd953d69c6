"""One-permutation MinHash with optimal densification (hvdllm.data.dedup.MinHasher): each entry
of two signatures is equal with probability J, the sets' Jaccard similarity; a document's
signature does not depend on the documents hashed with it (which differ with the number of
ranks); and every bin is filled, even for a document of one shingle."""

import numpy as np
import pytest

from hvdllm.data.dedup import MinHasher, shingle_hashes, word_hashes


def sets_with_jaccard(rng, size, jaccard):
    """Two sets of ``size`` elements with ``shared`` in common: J = shared / (2 size - shared)."""
    shared = round(2 * size * jaccard / (1 + jaccard))
    pool = rng.choice(1 << 62, size=2 * size - shared, replace=False).astype(np.uint64)
    return pool[:size], np.concatenate((pool[:shared], pool[size:]))


@pytest.mark.parametrize("size", [20, 300, 3000])
@pytest.mark.parametrize("jaccard", [0.3, 0.8])
def test_entries_collide_with_probability_jaccard(size, jaccard):
    rng = np.random.default_rng(size)
    hasher = MinHasher(num_perm=128)
    pairs = [sets_with_jaccard(rng, size, jaccard) for _ in range(60)]
    first = hasher.signatures([a for a, _ in pairs])
    second = hasher.signatures([b for _, b in pairs])
    estimate = (first == second).mean()  # 7680 entries: standard error below 0.006
    true = np.mean([len(np.intersect1d(a, b)) / len(np.union1d(a, b)) for a, b in pairs])
    assert abs(estimate - true) < 0.025, (estimate, true)


def test_a_signature_does_not_depend_on_its_batch():
    rng = np.random.default_rng(0)
    sets = [np.unique(rng.integers(0, 1 << 63, size=n, dtype=np.uint64)) for n in (1, 5, 200, 4000)]
    hasher = MinHasher(num_perm=64, seed=3)
    together = hasher.signatures(sets)
    for i, s in enumerate(sets):
        np.testing.assert_array_equal(hasher.signatures([s])[0], together[i])
    assert together.dtype == np.uint32 and together.shape == (4, 64)
    assert not np.array_equal(MinHasher(num_perm=64, seed=4).signatures(sets), together)  # the seed matters


def test_a_one_shingle_document_fills_every_bin_with_its_value():
    signature = MinHasher(num_perm=128).signatures([np.array([12345], dtype=np.uint64)])[0]
    assert len(set(signature.tolist())) == 1


def test_word_hashes_are_the_same_for_short_and_long_texts():
    """The hash powers are cached and grown between calls: a word hashes alike either way."""
    short = word_hashes("alpha beta")
    long = word_hashes("alpha beta " + "gamma " * 50000)
    np.testing.assert_array_equal(short, long[:2])
    assert short[0] != short[1]
    assert len(shingle_hashes("one two three", 5)) == 1  # fewer words than a shingle: one shingle
