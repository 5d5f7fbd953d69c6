"""How the parameter servers split the flat parameter vector: contiguous ranges of whole
tensors, about equal bytes, every tensor in exactly one range."""

import pytest

from hvdllm.errors import UserError
from hvdllm.parallel.ps_protocol import shard_ranges


@pytest.mark.parametrize("numels, servers, expected", [
    ([10, 10, 10, 10], 2, [(0, 2), (2, 4)]),
    ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),
    ([1, 1, 1, 100], 2, [(0, 3), (3, 4)]),
    ([5, 5, 5], 1, [(0, 3)]),
    ([4, 4, 4, 4, 4, 4], 3, [(0, 2), (2, 4), (4, 6)]),
])
def test_ranges_are_contiguous_whole_tensors_of_about_equal_size(numels, servers, expected):
    assert shard_ranges(numels, servers) == expected


def test_every_tensor_is_in_exactly_one_non_empty_range():
    numels = [7, 300, 2, 2, 64, 64, 900, 3, 3, 128]
    for servers in range(1, 6):
        ranges = shard_ranges(numels, servers)
        assert len(ranges) == servers and all(end > start for start, end in ranges)
        assert [i for start, end in ranges for i in range(start, end)] == list(range(len(numels)))


def test_more_servers_than_tensors_is_one_line_naming_the_key():
    with pytest.raises(UserError, match="parallel.servers=3 is more than the model's 2"):
        shard_ranges([4, 4], 3)
