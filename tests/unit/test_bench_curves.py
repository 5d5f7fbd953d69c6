"""When a loss curve has reached a target (bench straggler and grow): a run whose arithmetic
is the target run's, in another order of float sums, reaches it at the same step."""

from hvdllm.bench.curves import first_reaching


def curve(*losses):
    return [{"step": 5 * (i + 1), "val_loss": loss} for i, loss in enumerate(losses)]


def test_the_target_s_own_value_in_other_last_digits_is_reached():
    target = 6.394700447718303  # sync's loss at step 10
    assert first_reaching(curve(6.47, 6.394700447718999, 6.34), target)["step"] == 10
    assert first_reaching(curve(6.47, target * (1 + 5e-6), 6.34), target)["step"] == 10
    assert first_reaching(curve(6.47, 6.3948, 6.34), target)["step"] == 15
    assert first_reaching(curve(6.47, 6.45), target) is None
