"""Function-preserving growth (hvdllm/model/growth.py): the grown model's loss equals the small
one's before any step, for depth, width and both, in every model variant; the width copies
stop being copies after one step; shapes it cannot grow into are named."""

from dataclasses import replace

import pytest
import torch

from hvdllm.model import GPT, GPTConfig, language_model_loss
from hvdllm.model.growth import grow_state_dict, growth_problem

SMALL = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, d_model=16)
BIGGER = {"deeper": {"n_layer": 5}, "wider": {"d_model": 48, "n_head": 6},
          "both": {"n_layer": 3, "d_model": 32, "n_head": 4, "block_size": 32}}


def trained_like(cfg: GPTConfig) -> GPT:
    """A small model whose every parameter matters: random LayerNorm gains and biases too
    (fresh ones are 1 and 0, which would hide a mistake in how they are tiled)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def grown(small_model: GPT, big: GPTConfig) -> GPT:
    model = GPT(big)
    model.load_state_dict(grow_state_dict(small_model.state_dict(), small_model.cfg, big, model.state_dict(),
                                          torch.Generator().manual_seed(1)))
    return model


def batch(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return (torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=generator),
            torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=generator))


@pytest.mark.parametrize("growth", BIGGER)
@pytest.mark.parametrize("variant", [{}, {"tie_weights": False}, {"bias": False}, {"position": "rope"}])
def test_the_grown_model_has_the_small_ones_loss(growth, variant):
    small = replace(SMALL, **variant)
    small_model = trained_like(small)
    big_model = grown(small_model, replace(small, **BIGGER[growth]))
    ids, targets = batch(small)
    with torch.no_grad():
        expected = small_model.eval()(ids, targets)[1]
        logits, loss = big_model.eval()(ids, targets)
    assert abs(loss.item() - expected.item()) < 1e-5
    assert (logits - small_model(ids)[0]).abs().max().item() < 1e-4


def test_width_copies_part_after_one_step():
    """The split of each input over its copies carries noise summing to zero, so the copies
    get different gradients; without it they would stay copies and the model stay small."""
    big_model = grown(trained_like(SMALL), replace(SMALL, d_model=32, n_head=4))
    optimizer = torch.optim.SGD(big_model.parameters(), lr=0.1)
    ids, targets = batch(SMALL)
    language_model_loss(big_model(ids)[0], targets).backward()
    optimizer.step()
    fc = big_model.blocks[0].mlp.fc.weight  # rows 0..63 and 64..127: the hidden units and their copies
    assert (fc[:64] - fc[64:]).abs().max().item() > 1e-4


def test_new_blocks_start_as_identities_with_gradients():
    big_model = grown(trained_like(SMALL), replace(SMALL, n_layer=4))
    copy = big_model.blocks[1]  # block 0's copy
    assert copy.attn.proj.weight.abs().max() == 0 and copy.mlp.proj.weight.abs().max() == 0
    assert torch.equal(copy.attn.qkv.weight, big_model.blocks[0].attn.qkv.weight)
    ids, targets = batch(SMALL)
    language_model_loss(big_model(ids)[0], targets).backward()
    assert copy.mlp.proj.weight.grad.abs().max() > 0


@pytest.mark.parametrize("change, words", [({"d_model": 24, "n_head": 3}, "whole factor"),
                                            ({"d_model": 32}, "n_head alike"),
                                            ({"n_layer": 1}, "cannot shrink"),
                                            ({"vocab_size": 98}, "model.vocab_size differs"),
                                            ({"tie_weights": False}, "model.tie_weights differs")])
def test_a_shape_it_cannot_grow_into_is_named(change, words):
    assert words in growth_problem(SMALL, replace(SMALL, **change))
    with pytest.raises(ValueError, match=words):
        grow_state_dict(GPT(SMALL).state_dict(), SMALL, replace(SMALL, **change), {}, torch.Generator())
