"""Global-norm clipping when a rank holds only part of the gradients (pipeline stages, tensor
slices, ZeRO-2 shards): each rank sums the squares of its gradients, the strategy adds the
sums over the ranks holding the other parts, and every rank scales its own by the one norm."""

from __future__ import annotations

import torch
from torch import nn


def squares(params: list[nn.Parameter]) -> float:
    """The sum of the squares of the parameters' gradients, in float64."""
    return sum(p.grad.detach().double().square().sum().item() for p in params)


def clip_to_norm(grads: list[torch.Tensor], norm: float, max_norm: float) -> float:
    """Scale ``grads`` so that gradients of global norm ``norm`` have at most ``max_norm``, as
    torch.nn.utils.clip_grad_norm_ does; returns ``norm`` (inf or nan when a gradient is: the
    step is then skipped)."""
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return norm
