"""fp16 loss scaling across 2 pipeline stages, 2 tensor ranks, or the 2 shares of ZeRO-2's
gradients (a CPU GradScaler stands in for CUDA's): the model parts share one scale, unscaling gives the unscaled update, and an overflow
on one part skips the step and backs the scale off on both."""

import math

import pytest
import torch
from helpers.corpus import NANO

from hvdllm.config import load_config
from hvdllm.data.loader import Batch
from hvdllm.model import GPT, gpt_config_from
from hvdllm.parallel import Precision, build_strategy


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


LAYOUTS = {"pipeline": ["--parallel.pipeline=2", "--parallel.micro_batches=2"], "tensor": ["--parallel.tensor=2"],
           "zero 2": ["--parallel.zero=2"]}


def one_step(layout: str, scale: float, overflow_on_rank_1: bool = False):
    """One optimizer step of gpt-nano cut over 2 ranks; returns (weights before, after, the scaler)."""
    cfg = load_config(NANO, [*LAYOUTS[layout], "--optim.grad_clip=0"])
    strategy = build_strategy(cfg, world_size=2)
    strategy.setup(threads=1)
    torch.manual_seed(0)
    model = strategy.parallelize(GPT(gpt_config_from(cfg.model, vocab_size=64)), torch.device("cpu"))
    before = weights(model)
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    precision = Precision("fp32", torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    tokens = torch.randint(64, (4, 17), generator=torch.Generator().manual_seed(1))
    if overflow_on_rank_1 and strategy.coords.rank == 1:  # the last stage, the second tensor rank or data rank
        # In backward, before ZeRO-2's hooks send the gradient on (to its owner, either rank).
        next(model.parameters()).register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), math.inf))
    strategy.forward_backward(model, [Batch(tokens[:, :-1], tokens[:, 1:])], precision)
    strategy.finish_gradients(optimizer, torch.zeros(3, dtype=torch.float64))
    strategy.update(optimizer, model, precision, max_norm=0.0, nonfinite=False)
    return before, weights(model), precision.scaler


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scaled_parts_step_as_unscaled_ones(horovod, layout):
    _, plain, _ = one_step(layout, scale=0)
    _, scaled, scaler = one_step(layout, scale=2.0 ** 10)
    assert torch.allclose(plain, scaled, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow: no back-off


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_overflow_on_one_part_skips_and_backs_off_on_both(horovod, layout):
    before, after, scaler = one_step(layout, scale=2.0 ** 10, overflow_on_rank_1=True)
    # Rank 0's own gradients were finite, yet it skipped and backed off with rank 1.
    assert torch.equal(before, after)
    assert horovod.allgather_object(scaler.get_scale(), name="scales") == [2.0 ** 9, 2.0 ** 9]
