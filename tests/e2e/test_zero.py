"""ZeRO over the data axis through the CLI: zero 1 and 2 give zero 0's losses (fp32, dropout 0,
fixed seed, the same global batch), alone and inside pipeline and tensor layouts, and their
checkpoints (the whole optimizer state, gathered) resume on other layouts."""

import shutil

import pytest
from helpers.corpus import assert_same_losses, error_lines, hvdllm, hvdllm_mpi, read_metrics, train_args

STEPS = 12
# Clipping that acts on most steps, and two accumulated micro-batches per step.
COMMON = ("--checkpoint.every=0", f"--train.steps={STEPS}", "--optim.grad_clip=0.5", "--parallel.accum_steps=2",
          "--data.global_batch_size=8", "--model.vocab_size=264")


def run(np, data, run_dir, *overrides, steps_args=COMMON):
    args = train_args(data, run_dir, *steps_args, *overrides)
    result = hvdllm(*args) if np == 1 else hvdllm_mpi(np, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("optimizer, zeros", [("adamw", (1, 2)), ("lamb", (1,)), ("adafactor", (2,))])
def test_sharded_optimizer_and_gradients_give_unsharded_losses(data, tmp_path, optimizer, zeros):
    reference = run(2, data, tmp_path / "zero0", f"--optim.name={optimizer}")
    for zero in zeros:
        sharded = run(2, data, tmp_path / f"zero{zero}", f"--optim.name={optimizer}", f"--parallel.zero={zero}")
        assert_same_losses(reference, sharded, STEPS)
        records = read_metrics(sharded)
        unsharded = read_metrics(reference)
        # Each rank keeps about half the optimizer state (whole tensors: up to its largest one more).
        assert records[-1]["optimizer_state_bytes"] < 0.6 * unsharded[-1]["optimizer_state_bytes"]
        if zero == 2:
            assert "gradient_bytes" in records[-1]


def test_zero_2_inside_data_by_pipeline_with_a_tied_embedding(data, tmp_path):
    layout = ("--parallel.pipeline=2", "--parallel.data=2", "--parallel.micro_batches=2", "--model.tie_weights=true")
    reference = run(4, data, tmp_path / "zero0", *layout)
    sharded = run(4, data, tmp_path / "zero2", *layout, "--parallel.zero=2")
    assert_same_losses(reference, sharded, STEPS)


def test_zero_1_inside_tensor_by_data(data, tmp_path):
    reference = run(1, data, tmp_path / "one", "--optim.name=adafactor")
    sharded = run(4, data, tmp_path / "zero1", "--parallel.tensor=2", "--parallel.data=2", "--parallel.zero=1",
                  "--optim.name=adafactor")
    assert_same_losses(reference, sharded, STEPS)


RESUME = ("--train.steps=20", "--checkpoint.every=10", "--data.global_batch_size=8", "--optim.grad_clip=0.5")


@pytest.mark.parametrize("ranks, layout", [(1, ()), (2, ("--parallel.zero=0",)), (2, ("--parallel.zero=2",)),
                                           (2, ("--parallel.pipeline=2", "--parallel.micro_batches=2"))])
def test_a_zero_1_checkpoint_resumes_on_another_layout(data, tmp_path_factory, tmp_path, ranks, layout):
    full = tmp_path_factory.getbasetemp() / "zero1-full"
    if not full.exists():
        run(2, data, full, "--parallel.zero=1", steps_args=RESUME)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step-00000010.pt", resumed / "checkpoints")
    run(ranks, data, resumed, *layout, "--checkpoint.resume=auto", steps_args=RESUME)
    after = read_metrics(resumed)
    assert [r["step"] for r in after] == list(range(11, 21))
    expected = [r["loss"] for r in read_metrics(full)][10:]
    worst = max(abs(a - b) / abs(b) for a, b in zip([r["loss"] for r in after], expected))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.zero=3"], "parallel.zero must be 0, 1 or 2, got 3"),
    (["--parallel.zero=1", "--parallel.strategy=local-sgd"], "parallel.zero shards the optimizer state of a "
                                                             "synchronous data group"),
])
def test_bad_zero_settings_are_one_line(data, tmp_path, overrides, message):
    result = hvdllm(*train_args(data, tmp_path / "run", *overrides))
    assert result.returncode != 0 and message in error_lines(result)[0]
