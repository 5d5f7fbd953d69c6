"""ZeRO on 2 ranks in-process: a non-finite gradient on one rank skips the step on both, under
zero 1 (the all-reduced gradients carry it) and zero 2 (only its owner holds it after the
reduce-scatter; the norm adds every rank's share)."""

import math

import pytest
import torch
from helpers.agreement import parameters_equal_on_every_rank
from helpers.corpus import NANO

from hvdllm.config import load_config
from hvdllm.data.loader import Batch
from hvdllm.model import GPT, gpt_config_from
from hvdllm.optim import build_optimizer
from hvdllm.parallel import Precision, build_strategy


@pytest.mark.parametrize("zero", [1, 2])
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_both(horovod, zero):
    cfg = load_config(NANO, [f"--parallel.zero={zero}"])
    strategy = build_strategy(cfg, world_size=2)
    strategy.setup(threads=1)
    torch.manual_seed(0)
    model = strategy.parallelize(GPT(gpt_config_from(cfg.model, vocab_size=64)), torch.device("cpu"))
    optimizer = strategy.wrap_optimizer(build_optimizer(model, cfg.optim), model)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    tokens = torch.randint(64, (4, 17), generator=torch.Generator().manual_seed(horovod.rank()))
    precision = Precision("fp32", torch.device("cpu"))
    if horovod.rank() == 1:
        # In backward, before the gradient reaches its bucket (zero 2 sends buckets from there):
        # the last parameter, with two ranks not necessarily rank 1's own.
        list(model.parameters())[-1].register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), math.inf))
    strategy.forward_backward(model, [Batch(tokens[:, :-1], tokens[:, 1:])], precision)
    strategy.finish_gradients(optimizer, torch.zeros(3, dtype=torch.float64))
    norm, skipped = strategy.update(optimizer, model, precision, max_norm=1.0, nonfinite=False)
    assert not math.isfinite(norm) and skipped
    assert torch.equal(before, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert parameters_equal_on_every_rank(horovod, model)
