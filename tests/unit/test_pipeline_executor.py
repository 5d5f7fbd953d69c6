"""The pipeline executor over several model parts on one rank (the interleaved schedules'
virtual stages), in one process: the parts share the model's tensors, and running a schedule
over them gives the whole model's loss and gradients."""

import copy

import pytest
import torch

from hvdllm.data.loader import Batch
from hvdllm.model import GPT, GPTConfig
from hvdllm.parallel import Precision
from hvdllm.parallel.pipeline import PipelineExecutor, split_into_micro_batches
from hvdllm.parallel.schedules import BACKWARD, FORWARD, Action, add_communication, simulate
from hvdllm.parallel.stage_model import build_model_parts

FP32 = Precision("fp32", torch.device("cpu"))


def looped_gpipe(stages: int, micro_batches: int) -> list[Action]:
    """Every stage on one rank: forwards in stage order, backwards in reverse."""
    forwards = [Action(s, FORWARD, i) for i in range(micro_batches) for s in range(stages)]
    backwards = [Action(s, BACKWARD, i) for i in range(micro_batches) for s in reversed(range(stages))]
    return forwards + backwards


@pytest.mark.parametrize("tied", [False, True])
def test_three_parts_on_one_rank_give_the_whole_models_loss_and_gradients(tied):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, d_model=32, tie_weights=tied)
    whole = GPT(cfg)
    cut_up = copy.deepcopy(whole)
    tokens = torch.randint(64, (4, 17), generator=torch.Generator().manual_seed(1))
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    _, loss = whole(batch.inputs, batch.targets)
    loss.backward()

    parts = build_model_parts(cut_up, [1, 2, 1], stages=[0, 1, 2])
    assert [(p.start, p.stop) for p in parts] == [(0, 1), (1, 3), (3, 4)]
    assert parts[0].gpt.blocks[0] is cut_up.blocks[0]  # shared, not copied
    schedule = add_communication([looped_gpipe(3, 2)], stages=3)
    assert [a.op for a in schedule[0]] == [a.op for a in looped_gpipe(3, 2)]  # one rank: nothing travels
    simulate(schedule)
    executor = PipelineExecutor(dict(enumerate(parts)), schedule[0], transport=None, ranks=1, stages=3,
                                device=torch.device("cpu"))
    losses = executor.run(split_into_micro_batches(batch, 2), FP32, loss_weight=1 / 2)

    assert sum(losses) / 2 == pytest.approx(loss.item(), rel=1e-6)
    expected = dict(whole.named_parameters())
    for name, param in cut_up.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=name)
