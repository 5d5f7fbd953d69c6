"""Pipeline schedules and the partitioner, in one process."""

import pytest

from hvdllm.choices import PIPELINE_SCHEDULES
from hvdllm.errors import UserError
from hvdllm.model import preset_config
from hvdllm.parallel.partition import UnitCosts, balanced_cut, check_manual_cut, imbalance, stage_costs
from hvdllm.parallel.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SCHEDULES, SEND_ACT, SEND_GRAD,
                                       Action, add_communication, build_schedule, bubble_fraction,
                                       peak_activations, schedule_table, simulate)
from hvdllm.parallel.stage_model import plan_cut, unit_costs


def test_every_schedule_name_is_implemented():
    assert tuple(SCHEDULES) == PIPELINE_SCHEDULES


@pytest.mark.parametrize("name", PIPELINE_SCHEDULES)
@pytest.mark.parametrize("stages, micro", [(1, 1), (2, 1), (2, 4), (4, 8), (4, 2), (3, 5)])
def test_each_stage_forwards_and_backwards_every_micro_batch_once(name, stages, micro):
    for rank, actions in enumerate(build_schedule(name, stages, micro)):
        assert {a.stage for a in actions} == {rank}
        for op in (FORWARD, BACKWARD):
            assert sorted(a.micro for a in actions if a.op == op) == list(range(micro))
        firsts = {a.micro: i for i, a in reversed(list(enumerate(actions))) if a.op == FORWARD}
        assert all(firsts[a.micro] < i for i, a in enumerate(actions) if a.op == BACKWARD)
        if rank == 0:
            assert not any(a.op in (RECV_ACT, SEND_GRAD) for a in actions)
        if rank == stages - 1:
            assert not any(a.op in (SEND_ACT, RECV_GRAD) for a in actions)


@pytest.mark.parametrize("name", PIPELINE_SCHEDULES)
@pytest.mark.parametrize("stages, micro", [(2, 1), (2, 4), (4, 8), (4, 2), (3, 5)])
def test_sends_match_receives_in_order_and_nothing_deadlocks(name, stages, micro):
    schedule = build_schedule(name, stages, micro)
    for s in range(stages - 1):
        sends = [a.micro for a in schedule[s] if a.op == SEND_ACT]
        assert sends == [a.micro for a in schedule[s + 1] if a.op == RECV_ACT]
        grads = [a.micro for a in schedule[s + 1] if a.op == SEND_GRAD]
        assert grads == [a.micro for a in schedule[s] if a.op == RECV_GRAD]
    simulate(schedule)  # raises on a deadlock or a rule broken


def test_the_communication_pass_adds_transfers_only_between_ranks():
    compute = [[Action(0, FORWARD, 0), Action(0, BACKWARD, 0)], [Action(1, FORWARD, 0), Action(1, BACKWARD, 0)]]
    assert [str(a) for a in add_communication(compute, 2)[0]] == ["0F0", "0sa0", "0rg0", "0B0", ]
    assert [str(a) for a in add_communication(compute, 2)[1]] == ["1ra0", "1F0", "1B0", "1sg0"]
    # Two stages on each of two ranks (a looped placement): 0 -> 1 and 2 -> 3 cross ranks, and
    # 1 -> 2 crosses back; nothing travels within a rank.
    looped = [[Action(0, FORWARD, 0), Action(2, FORWARD, 0), Action(2, BACKWARD, 0), Action(0, BACKWARD, 0)],
              [Action(1, FORWARD, 0), Action(3, FORWARD, 0), Action(3, BACKWARD, 0), Action(1, BACKWARD, 0)]]
    full = add_communication(looped, 4)
    assert [str(a) for a in full[0]] == ["0F0", "0sa0", "2ra0", "2F0", "2sa0", "2rg0", "2B0", "2sg0", "0rg0", "0B0"]
    assert simulate(full).peak_activations == [2, 2]
    local = add_communication([[Action(0, FORWARD, 0), Action(1, FORWARD, 0), Action(1, BACKWARD, 0),
                                 Action(0, BACKWARD, 0)]], 2)
    assert [a.op for a in local[0]] == [FORWARD, FORWARD, BACKWARD, BACKWARD]  # one rank: no transfer
    simulate(local)


@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 8), (4, 2), (2, 1)])
def test_peak_activations_gpipe_holds_all_1f1b_at_most_the_stages_left(stages, micro):
    assert peak_activations("gpipe", stages, micro) == [micro] * stages
    peaks = peak_activations("1f1b", stages, micro)
    assert peaks == [min(stages - s, micro) for s in range(stages)]
    assert max(peaks) <= stages


def test_the_simulator_catches_a_deadlock_and_broken_rules():
    receive_first = [[Action(0, RECV_GRAD, 0), Action(0, FORWARD, 0), Action(0, SEND_ACT, 0), Action(0, BACKWARD, 0)],
                     [Action(1, RECV_ACT, 0), Action(1, FORWARD, 0), Action(1, BACKWARD, 0), Action(1, SEND_GRAD, 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(receive_first)
    with pytest.raises(RuntimeError, match="before its forward"):
        simulate([[Action(0, BACKWARD, 0), Action(0, FORWARD, 0)]])
    no_receive = [[Action(0, FORWARD, 0), Action(0, SEND_ACT, 0)], [Action(1, FORWARD, 0)]]
    with pytest.raises(RuntimeError, match="before receiving its input"):
        simulate(no_receive)
    with pytest.raises(RuntimeError, match="lives on rank 1"):
        simulate([[Action(1, FORWARD, 0)], []])


def test_the_simulator_catches_stray_sends_missing_and_repeated_micro_batches():
    stray = build_schedule("gpipe", 2, 2)
    stray[0].append(Action(0, SEND_ACT, 1))
    with pytest.raises(RuntimeError, match="act of micro-batch 1 sent to stage 1 is never received"):
        simulate(stray)
    missing = build_schedule("gpipe", 2, 2)
    missing[1] = [a for a in missing[1] if a.micro == 0]
    missing[0] = [a for a in missing[0] if not (a.micro == 1 and a.op in (RECV_GRAD, BACKWARD))]
    with pytest.raises(RuntimeError, match="never"):
        simulate(missing)
    twice = [[Action(0, FORWARD, 0), Action(0, FORWARD, 0), Action(0, BACKWARD, 0)]]
    with pytest.raises(RuntimeError, match="forward of micro-batch 0 twice"):
        simulate(twice)


def test_a_schedule_as_a_table_shows_the_bubble():
    rows = schedule_table(build_schedule("1f1b", 2, 3))
    assert rows == ["rank 0: 0F0 0F1   . 0B0 0F2 0B1   . 0B2",
                    "rank 1:   . 1F0 1B0 1F1 1B1 1F2 1B2   ."]
    assert bubble_fraction(2, 3) == pytest.approx(1 / 4) and bubble_fraction(2, 3, 2) == pytest.approx(1 / 7)


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


def test_a_tensor_group_divides_the_stage_costs():
    from hvdllm.config import ParallelConfig

    cfg = preset_config("gpt-mini")
    for balance in ("params", "flops"):
        whole = plan_cut(cfg, ParallelConfig(pipeline=2, balance=balance), 2, 256, 4)
        split = plan_cut(cfg, ParallelConfig(pipeline=2, tensor=2, balance=balance), 2, 256, 4)
        assert split[0] == whole[0] and split[1] == pytest.approx([c / 2 for c in whole[1]])
    memory = plan_cut(cfg, ParallelConfig(pipeline=2, tensor=2, balance="memory"), 2, 256, 4)[1]
    assert max(memory) < max(plan_cut(cfg, ParallelConfig(pipeline=2, balance="memory"), 2, 256, 4)[1])

