"""Pipeline schedules and the partitioner, in one process."""

import pytest

from hvdllm.choices import PIPELINE_SCHEDULES
from hvdllm.errors import UserError
from hvdllm.model import preset_config
from hvdllm.parallel.partition import UnitCosts, balanced_cut, check_manual_cut, imbalance, stage_costs
from hvdllm.parallel.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SCHEDULES, SEND_ACT, SEND_GRAD,
                                       Action, build_schedule, simulate)
from hvdllm.parallel.stage_model import plan_cut, unit_costs


def all_stages(name, stages, micro):
    return [build_schedule(name, s, stages, micro) for s in range(stages)]


def test_every_schedule_name_is_implemented():
    assert tuple(SCHEDULES) == PIPELINE_SCHEDULES


@pytest.mark.parametrize("name", PIPELINE_SCHEDULES)
@pytest.mark.parametrize("stages, micro", [(1, 1), (2, 1), (2, 4), (4, 8), (4, 2), (3, 5)])
def test_each_stage_forwards_and_backwards_every_micro_batch_once(name, stages, micro):
    for stage, actions in enumerate(all_stages(name, stages, micro)):
        for op in (FORWARD, BACKWARD):
            assert sorted(a.micro for a in actions if a.op == op) == list(range(micro))
        firsts = {a.micro: i for i, a in reversed(list(enumerate(actions))) if a.op == FORWARD}
        assert all(firsts[a.micro] < i for i, a in enumerate(actions) if a.op == BACKWARD)
        assert not any(a.op in (RECV_ACT, SEND_GRAD) for a in actions) if stage == 0 else True
        assert not any(a.op in (SEND_ACT, RECV_GRAD) for a in actions) if stage == stages - 1 else True


@pytest.mark.parametrize("name", PIPELINE_SCHEDULES)
@pytest.mark.parametrize("stages, micro", [(2, 1), (2, 4), (4, 8), (4, 2), (3, 5)])
def test_sends_match_receives_in_order_and_nothing_deadlocks(name, stages, micro):
    schedules = all_stages(name, stages, micro)
    for s in range(stages - 1):
        sends = [a.micro for a in schedules[s] if a.op == SEND_ACT]
        assert sends == [a.micro for a in schedules[s + 1] if a.op == RECV_ACT]
        grads = [a.micro for a in schedules[s + 1] if a.op == SEND_GRAD]
        assert grads == [a.micro for a in schedules[s] if a.op == RECV_GRAD]
    simulate(schedules)  # raises on a deadlock or a rule broken


@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 8), (4, 2), (2, 1)])
def test_peak_activations_gpipe_holds_all_1f1b_at_most_the_stages_left(stages, micro):
    assert simulate(all_stages("gpipe", stages, micro)).peak_activations == [micro] * stages
    peaks = simulate(all_stages("1f1b", stages, micro)).peak_activations
    assert peaks == [min(stages - s, micro) for s in range(stages)]
    assert max(peaks) <= stages


def test_the_simulator_catches_a_deadlock_and_a_backward_before_its_forward():
    receive_first = [[Action(RECV_GRAD, 0), Action(FORWARD, 0), Action(SEND_ACT, 0), Action(BACKWARD, 0)],
                     [Action(RECV_ACT, 0), Action(FORWARD, 0), Action(BACKWARD, 0), Action(SEND_GRAD, 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(receive_first)
    with pytest.raises(RuntimeError, match="before its forward"):
        simulate([[Action(BACKWARD, 0), Action(FORWARD, 0)]])


def test_balanced_cut_by_hand():
    # Blocks costing 1..6 in 3 stages: a largest stage of 8 would need {6} and {5} last, leaving
    # 1+2+3+4 = 10 first; so 9 is optimal, reached by [1,2,3 | 4,5 | 6] = 6 | 9 | 6.
    costs = UnitCosts(0.0, (1, 2, 3, 4, 5, 6), 0.0)
    assert balanced_cut(costs, 3) == [3, 2, 1]
    assert stage_costs(costs, [3, 2, 1]) == [6, 9, 6]
    # The head on the last stage pushes blocks forward: [1,2,3,4,5 | 6 + 10] = 15 | 16.
    assert balanced_cut(UnitCosts(0.0, (1, 2, 3, 4, 5, 6), 10.0), 2) == [5, 1]
    # An embedding as heavy as four blocks leaves the first stage one block.
    assert balanced_cut(UnitCosts(4.0, (1, 1, 1, 1, 1, 1), 0.0), 2) == [1, 5]
    # Activations held per micro-batch weigh the first stages more (1F1B: p - s held).
    held = {0: 2, 1: 1}
    assert balanced_cut(UnitCosts(0.0, (0,) * 6, 0.0, (1,) * 6), 2, held.get) == [2, 4]
    assert imbalance([6, 9, 6]) == pytest.approx(9 / 7)


def test_greedy_is_not_enough():
    # A greedy fill up to the mean (5) would cut [2,2 | 2,2 | 7]; the exact cut is better.
    costs = UnitCosts(0.0, (2, 2, 2, 2, 7), 0.0)
    assert max(stage_costs(costs, balanced_cut(costs, 3))) == 7


@pytest.mark.parametrize("stage_layers, message", [
    ([1, 1], "has 2 entries for parallel.pipeline=3"),
    ([1, 1, 1], "sums to 3, but the model has 4 blocks"),
])
def test_manual_cut_must_fit(stage_layers, message):
    with pytest.raises(UserError, match=message):
        check_manual_cut(stage_layers, 3, 4)


def test_more_stages_than_blocks_is_one_line():
    with pytest.raises(UserError, match="parallel.pipeline=3 stages need at least one block each; the model has 2"):
        balanced_cut(UnitCosts(0.0, (1, 1), 0.0), 3)


def test_costs_of_a_real_model():
    cfg = preset_config("gpt-mini")
    params = unit_costs(cfg, "params", 256, 4)
    d, v = cfg.d_model, cfg.vocab_size
    assert params.blocks[0] == 12 * d * d + 13 * d  # qkv, proj, fc, proj weights and biases, two LayerNorms
    assert params.embedding == v * d + cfg.block_size * d and params.head == 2 * d + v * d
    flops = unit_costs(cfg, "flops", 256, 4)
    assert flops.embedding == 0 and flops.blocks[0] == 6 * params.blocks[0] + 12 * d * 256
    memory = unit_costs(cfg, "memory", 256, 4)
    assert memory.activations and memory.blocks[0] == 16 * params.blocks[0]


def test_plan_cut_uses_stage_layers_or_balances():
    from hvdllm.config import ParallelConfig

    cfg = preset_config("gpt-mini")  # 4 blocks, a large head and embedding
    cut, costs = plan_cut(cfg, ParallelConfig(pipeline=2), 2, 256, 4)
    assert sum(cut) == 4 and len(costs) == 2
    assert plan_cut(cfg, ParallelConfig(pipeline=2, stage_layers=[1, 3]), 2, 256, 4)[0] == [1, 3]
