"""Tensor parallelism's pieces on 2 ranks: the vocabulary-parallel cross entropy against the
whole one, and dropout's random streams (alike where activations are replicated, apart where
they are split)."""

import copy

import torch
import torch.nn.functional as F

from hvdllm import comm
from hvdllm.model import GPT, GPTConfig
from hvdllm.parallel.tensor import apply_tensor_parallel, split_region_rng
from hvdllm.parallel.vocab_parallel_loss import vocab_parallel_cross_entropy


def tensor_group():
    return comm.init({("tensor",): [[0, 1]]}, mpi=True).group(("tensor",))


def test_vocab_parallel_cross_entropy_equals_the_whole_one(horovod):
    group = tensor_group()
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(24, 10, generator=generator)).requires_grad_()  # alike on both ranks
    targets = torch.randint(10, (24,), generator=generator)
    whole = F.cross_entropy(logits, targets, reduction="none")
    (whole * torch.arange(24.0)).sum().backward()  # an uneven weight per token
    start = 5 * group.rank
    mine = logits.detach()[:, start:start + 5].clone().requires_grad_()
    losses, right = vocab_parallel_cross_entropy(mine, targets, start, group)
    (losses * torch.arange(24.0)).sum().backward()
    torch.testing.assert_close(losses, whole.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.grad, logits.grad[:, start:start + 5], rtol=1e-5, atol=1e-5)
    assert torch.equal(right, logits.detach().argmax(-1) == targets)


def test_split_regions_draw_apart_and_replicated_ones_alike(horovod):
    group = tensor_group()
    torch.manual_seed(7)  # the shared stream, alike on both ranks
    state = torch.get_rng_state()
    with split_region_rng(group, torch.device("cpu")):
        split = torch.rand(6)
    replicated = torch.rand(6)
    every = horovod.allgather_object((split, replicated), name="streams")  # [(split, replicated)] by rank
    split_every, replicated_every = [e[0] for e in every], [e[1] for e in every]
    assert not torch.equal(split_every[0], split_every[1])
    assert torch.equal(replicated_every[0], replicated_every[1])
    torch.set_rng_state(state)  # as activation checkpointing does before recomputing
    with split_region_rng(group, torch.device("cpu")):
        assert torch.equal(torch.rand(6), split)


def test_with_dropout_the_split_model_keeps_replicated_activations_alike(horovod):
    group = tensor_group()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.2)
    model = apply_tensor_parallel(copy.deepcopy(GPT(cfg)), group).train()
    torch.manual_seed(1)
    tokens = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    hidden = model.run_blocks(model.embed(tokens))  # (B, T, C): replicated across the group
    every = horovod.allgather_object(hidden.detach(), name="hidden")
    assert torch.equal(every[0], every[1])
    model.eval()
    assert torch.equal(model.run_blocks(model.embed(tokens)), model.run_blocks(model.embed(tokens)))
