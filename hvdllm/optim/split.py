"""How an optimizer sees parameters that are split over ranks (tensor parallelism).

LAMB's trust ratio and Adafactor's step size and factored moments are statistics of a whole
tensor: its norm, the mean of its squared gradient along a row or a column. A rank holding a
slice of the tensor computes its part of each and sums the parts over the ranks that hold the
others. :class:`SplitParameters` is what the optimizer asks of the parallel layer for that;
None means every parameter is whole.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SplitParameters(Protocol):
    ranks: int  # the number of slices a split parameter is cut into

    def split_dim(self, param: torch.Tensor) -> int | None:
        """The dimension along which ``param`` is cut, or None when this rank holds it whole."""

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks sharing the split parameters (a collective: every
        rank calls it, in the same order, with the same shape)."""


def sum_parts(split: SplitParameters, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each of ``parts`` summed over the ranks, in one message (at least fp32)."""
    if not parts:
        return []
    dtype = torch.promote_types(torch.float32, parts[0].dtype)
    flat = split.sum_(torch.cat([part.reshape(-1).to(dtype) for part in parts]))
    return [whole.view_as(part) for whole, part in zip(flat.split([p.numel() for p in parts]), parts)]
