"""train.slowdown_rank under a pipeline: the slowed stage sleeps, the other does not."""

import torch
from helpers.corpus import NANO

from hvdllm.config import load_config
from hvdllm.data.loader import Batch
from hvdllm.model import GPT, gpt_config_from
from hvdllm.parallel import Precision, build_strategy


def test_the_slowed_stage_sleeps_and_the_other_does_not(horovod, monkeypatch):
    cfg = load_config(NANO, ["--parallel.pipeline=2", "--parallel.micro_batches=2", "--train.slowdown_rank=1",
                             "--train.slowdown_factor=3"])
    strategy = build_strategy(cfg, world_size=2)
    strategy.setup(threads=1)
    torch.manual_seed(0)
    model = strategy.parallelize(GPT(gpt_config_from(cfg.model, vocab_size=64)), torch.device("cpu"))
    slept = []
    monkeypatch.setattr("hvdllm.parallel.base.time.sleep", slept.append)
    tokens = torch.randint(64, (4, 17), generator=torch.Generator().manual_seed(1))
    strategy.forward_backward(model, [Batch(tokens[:, :-1], tokens[:, 1:])], Precision("fp32", torch.device("cpu")))
    if horovod.rank() == 1:
        assert len(slept) == 1 and slept[0] > 0  # twice its own forward and backward
    else:
        assert slept == []
    for param in model.parameters():
        param.grad = None
