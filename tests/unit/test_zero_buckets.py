"""ZeRO's ownership and buckets: whole tensors dealt largest first, buckets in backward's order,
and a bucket reduce-scattered only where padding the ranks' shares sends no more than an
all-reduce would."""

import torch
from torch import nn

from hvdllm.parallel.zero import _Bucket, assign_owners, bucket_parameters


def test_whole_tensors_go_largest_first_to_the_least_loaded_rank_and_pinned_ones_stay():
    assert assign_owners([10, 40, 30, 20], 2) == [0, 0, 1, 1]
    assert assign_owners([10, 40, 30, 20], 2, pinned={0: 1}) == [1, 0, 1, 0]
    assert assign_owners([50, 40, 30], 2, pinned={2: 0}) == [1, 0, 0]


def test_buckets_fill_from_the_last_tensor_to_the_first():
    assert bucket_parameters([4, 4, 4, 4, 4], element_bytes=4, bucket_bytes=32) == [[4, 3], [2, 1], [0]]


def _params(*sizes: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(size)) for size in sizes]


def test_a_bucket_is_reduce_scattered_only_where_padding_costs_no_more_than_an_all_reduce():
    balanced = _Bucket([_params(30, 10), _params(40)], name="b")
    assert balanced.scatters and balanced.flat_length == 80 and balanced.offset(1) == 40
    # One rank owns nearly all of it (an embedding): padding 8 shares to its length would send 4x.
    lopsided = _Bucket([_params(100), *[_params(1) for _ in range(7)]], name="e")
    assert not lopsided.scatters and lopsided.flat_length == 107 and lopsided.offset(3) == 102
