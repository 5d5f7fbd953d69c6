"""Helpers for Horovod process sets: which ranks talk to which in a parallel layout."""

from __future__ import annotations


def contiguous_groups(world_size: int, group_size: int) -> list[list[int]]:
    """Split ranks 0..world_size-1 into consecutive groups of ``group_size``.

    Used for layouts such as pipeline stages or model-parallel groups, where ranks that
    share a node should share a group. Raises ValueError when the sizes do not divide.
    """
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"world size {world_size} is not divisible into groups of {group_size}")
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]
