"""Validation: loss, perplexity and next-token accuracy on the val split, over all ranks."""

from __future__ import annotations

import math

import torch
from torch import nn

from hvdllm.data import DistributedBatches, ShardedSamples
from hvdllm.parallel import ParallelStrategy, Precision
from hvdllm.train.phases import Phase


@torch.no_grad()
def evaluate(model: nn.Module, samples: ShardedSamples, strategy: ParallelStrategy, precision: Precision,
             phase: Phase, seed: int, max_batches: int) -> dict:
    """Collective. Each data-parallel rank reads its own slice of the val split (``max_batches``
    batches of the training ``phase``'s batch size and sequence length); the sums travel in one
    allreduce, so every rank gets the mean over all tokens read, not the mean of the ranks'
    means."""
    model.eval()
    rank, ranks = strategy.data_rank
    loader = DistributedBatches(samples, rank, ranks, phase.batch_size, seed=seed, shuffle=False,
                                seq_len=phase.seq_len, prefetch=0)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, correct
    batches = iter(loader)
    for _ in range(min(max_batches, loader.batches_per_epoch)):
        batch = next(batches)
        logits = strategy.forward_only(model, batch.inputs, precision)
        if logits is None:
            continue  # a pipeline stage before the last: the last one counts this batch
        mask = batch.loss_mask.to(logits.device) if batch.loss_mask is not None else None
        # Every rank of a tensor group takes part (a collective); one of them counts the batch.
        batch_sums = model.loss_function.sums(logits, batch.targets.to(logits.device), mask)
        if strategy.reports_loss:
            sums += torch.stack(batch_sums).double().cpu()
    sums = strategy.allreduce_sum(sums, name="eval_stats")
    val_loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
            "val_acc": (sums[2] / sums[1].clamp(min=1)).item()}
