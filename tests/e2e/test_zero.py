"""ZeRO over the data axis through the CLI: zero 1 and 2 give zero 0's losses (fp32, dropout 0,
fixed seed, the same global batch), alone and inside pipeline and tensor layouts, and their
checkpoints (the whole optimizer state, gathered) resume on other layouts."""

import shutil
import subprocess
import time

import pytest
from helpers.corpus import assert_same_losses, clean_env, error_lines, hvdllm, hvdllm_mpi, read_metrics, train_args

from hvdllm.comm.launch import mpirun_command

STEPS = 12
# Clipping that acts on most steps, and accumulated micro-batches (global 8 of micro-batches of 2: 4 on one rank, 2 on two).
COMMON = ("--checkpoint.every=0", f"--train.steps={STEPS}", "--optim.grad_clip=0.5", "--data.batch_size=2",
          "--data.global_batch_size=8", "--model.vocab_size=264")


def run(np, data, run_dir, *overrides, steps_args=COMMON):
    args = train_args(data, run_dir, *steps_args, *overrides)
    result = hvdllm(*args) if np == 1 else hvdllm_mpi(np, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# Buckets of 20 kB: gpt-nano's gradients go in a dozen reduce-scatters, started during backward.
SMALL_BUCKETS = "--parallel.zero_bucket_mb=0.02"


@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "adafactor"])
def test_sharded_optimizer_and_gradients_give_unsharded_losses(data, tmp_path, optimizer):
    reference = run(2, data, tmp_path / "zero0", f"--optim.name={optimizer}")
    for zero in (1, 2):
        buckets = (SMALL_BUCKETS,) if optimizer == "adamw" else ()  # adafactor: one bucket (25 MB)
        sharded = run(2, data, tmp_path / f"zero{zero}", f"--optim.name={optimizer}", f"--parallel.zero={zero}",
                      *buckets)
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
    sharded = run(4, data, tmp_path / "zero2", *layout, "--parallel.zero=2", SMALL_BUCKETS)
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


# Loaded at start-up by every rank (sitecustomize on PYTHONPATH): rank 1 gets SIGNAL as it
# enters the all-gather of the owners' parameters in step 3, when rank 0 is already inside it.
_DIE_IN_ALL_GATHER = """
import os, signal
from hvdllm.parallel import zero

_gather, _calls = zero.ShardedUpdate._gather_parameters, [0]

def _gather_or_die(self):
    _calls[0] += 1
    if _calls[0] == 3 and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        os.kill(os.getpid(), signal.{signal})
    _gather(self)

zero.ShardedUpdate._gather_parameters = _gather_or_die
"""


@pytest.mark.parametrize("dying", ["SIGKILL", "SIGSTOP"])
def test_a_rank_lost_during_the_all_gather_ends_the_job_within_the_stall_bound(data, tmp_path, dying):
    """Killed (its launcher sees it go) or stopped (a hung node: only the stall watchdog of the
    rank waiting in the all-gather can tell): the job ends, not hangs, within the stall bound."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DIE_IN_ALL_GATHER.replace("{signal}", dying))
    run_dir = tmp_path / "run"
    args = train_args(data, run_dir, "--parallel.zero=1", "--train.steps=50", "--checkpoint.every=0",
                      "--train.eval_every=0", "--train.stall_timeout_s=8")
    env = clean_env({**clean_env(), "PYTHONPATH": str(hook)})
    start = time.time()
    proc = subprocess.Popen(mpirun_command(2, ["-m", "hvdllm", *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        for sig in ("-CONT", "-KILL"):  # a stopped rank the launcher left behind
            subprocess.run(["pkill", sig, "-f", str(run_dir)], check=False)
    ended_after = time.time() - start
    assert proc.returncode != 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # the hook struck in step 3
    assert ended_after < 90, ended_after  # start-up, 8 s of stall, the launcher's teardown
    if dying == "SIGSTOP":
        assert "error: stall: rank 0 of 2 completed step 2" in err, err[-3000:]
