"""The cross entropy over vocabulary-parallel logits (Megatron-LM): each rank of a tensor group
holds the logits of its slice of the vocabulary; three small all-reduces (the maximum, the sum
of exponentials, the target's logit) give every rank the whole loss, and the full logits are
never gathered."""

from __future__ import annotations

import torch

from hvdllm.comm.groups import Group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, start, group):
        local = logits.float()  # (N, V/t)
        top = group.allreduce_(local.max(dim=-1).values, op="max")  # (N,)
        shifted = local - top[:, None]
        exp = shifted.exp()
        sum_exp = group.allreduce_(exp.sum(dim=-1))  # (N,)
        ids = targets - start
        here = (ids >= 0) & (ids < local.shape[-1])
        ids = ids.clamp(0, local.shape[-1] - 1)
        target = group.allreduce_(shifted.gather(1, ids[:, None]).squeeze(1) * here)  # (N,) its shifted logit
        ctx.save_for_backward(exp / sum_exp[:, None], ids, here)
        ctx.dtype = logits.dtype
        ctx.mark_non_differentiable(target)
        return sum_exp.log() - target, target

    @staticmethod
    def backward(ctx, grad_loss, _grad_target):
        softmax, ids, here = ctx.saved_tensors
        grad = softmax.clone()
        grad[torch.arange(len(ids)), ids] -= here.to(grad.dtype)
        return (grad * grad_loss[:, None]).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int,
                                 group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy (N,) in fp32 from each rank's logits (N, V/t) for the vocabulary
    [start, start + V/t), and whether the target has the largest logit (N,; ties count as
    right). Collective: every rank of ``group`` calls it with its slice."""
    losses, target = _VocabParallelCrossEntropy.apply(logits, targets, start, group)
    return losses, target >= 0


class VocabParallelLoss:
    """The model's loss functions over vocabulary-parallel logits (as language_model_loss and
    masked_loss_sums over whole ones)."""

    def __init__(self, group: Group, start: int) -> None:
        self.group, self.start = group, start

    def _tokens(self, logits, targets, loss_mask):
        losses, right = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.start, self.group)
        weights = torch.ones_like(losses) if loss_mask is None else loss_mask.flatten().to(losses.dtype)
        return losses, right, weights

    def __call__(self, logits, targets, loss_mask=None) -> torch.Tensor:
        losses, _, weights = self._tokens(logits, targets, loss_mask)
        return (losses * weights).sum() / weights.sum().clamp(min=1.0)

    def sums(self, logits, targets, loss_mask=None):
        losses, right, weights = self._tokens(logits, targets, loss_mask)
        return (losses * weights).sum(), weights.sum(), (right.to(losses.dtype) * weights).sum()
