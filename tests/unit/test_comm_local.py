import pytest

from hvdllm.comm import contiguous_groups, threads_per_rank


def test_contiguous_groups():
    assert contiguous_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="not divisible"):
        contiguous_groups(6, 4)


def test_threads_per_rank():
    assert threads_per_rank(1, cores=2) == 2
    assert threads_per_rank(3, cores=2) == 1
