"""Layer-wise model parallel through the CLI: pipeline stages across ranks (GPipe, 1F1B),
data x pipeline on 4 ranks, and placement across devices in one process each give the
losses of one plain rank on the same data (fp32, fixed seed, the same global batch)."""

import os
import signal
import subprocess
import time

import pytest
from helpers.corpus import (assert_same_losses, clean_env, error_lines, hvdllm, hvdllm_mpi, losses, rank_pids,
                            read_metrics, train_args)

from hvdllm.comm.launch import mpirun_command

PIPELINE = ["--parallel.pipeline=2", "--parallel.micro_batches=2"]


def run(np, data, run_dir, *overrides):
    args = train_args(data, run_dir, "--checkpoint.every=0", *overrides)
    result = hvdllm(*args) if np == 1 else hvdllm_mpi(np, *args)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    return run(1, data, tmp_path_factory.mktemp("one") / "run")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_give_the_losses_of_one_rank(data, tmp_path, one_rank, schedule):
    piped = run(2, data, tmp_path / "run", *PIPELINE, f"--parallel.schedule={schedule}")
    assert_same_losses(one_rank, piped, 20)
    val = [[r["val_loss"] for r in read_metrics(d) if "val_loss" in r] for d in (one_rank, piped)]
    assert val[0] and abs(val[0][-1] - val[1][-1]) / val[0][-1] < 1e-5  # evaluated through the stages


def test_a_pipeline_without_micro_batches_set_pipelines_and_says_so(data, tmp_path, one_rank):
    """parallel.micro_batches left at 0: the largest divisor of the batch (4) up to 4 x stages,
    so the stages overlap; the banner names the cut, schedule, count and bubble."""
    args = train_args(data, tmp_path / "run", "--checkpoint.every=0", "--parallel.pipeline=2")
    result = hvdllm_mpi(2, *args)
    assert result.returncode == 0, result.stderr
    assert ("pipeline     2 stages of 1, 1 blocks, schedule 1f1b, 4 micro-batches of 1: expected bubble 20% "
            "((p - 1) / (m + p - 1) with equal stages)") in result.stdout.splitlines(), result.stdout
    assert_same_losses(one_rank, tmp_path / "run", 20)


def test_data_by_pipeline_on_four_ranks_gives_the_losses_of_one_rank(data, tmp_path):
    reference = run(1, data, tmp_path / "one", "--data.batch_size=8", "--train.steps=10")
    hybrid = run(4, data, tmp_path / "hybrid", "--parallel.data=2", *PIPELINE, "--train.steps=10")
    assert_same_losses(reference, hybrid, 10)


LOCAL_SGD = ["--parallel.strategy=local-sgd", "--parallel.local_steps=3", "--parallel.outer_lr=0.7",
             "--parallel.outer_momentum=0.9"]


def test_local_sgd_per_stage_gives_the_losses_of_local_sgd_on_whole_replicas(data, tmp_path):
    """Averaging each stage's deltas over its data group is averaging the whole replicas':
    data 2 x pipeline 2 with local SGD (H = 3, Nesterov outer step) trains like data 2."""
    replicas = run(2, data, tmp_path / "replicas", "--train.steps=8", *LOCAL_SGD)
    piped = run(4, data, tmp_path / "piped", "--parallel.data=2", *PIPELINE, "--train.steps=8", *LOCAL_SGD)
    assert_same_losses(replicas, piped, 8)


def test_pipeline_with_local_sgd_at_one_step_and_a_plain_outer_step_is_pipeline_sync(data, tmp_path):
    plain = ["--parallel.strategy=local-sgd", "--parallel.local_steps=1", "--parallel.outer_lr=1",
             "--parallel.outer_momentum=0"]
    synced = run(2, data, tmp_path / "sync", *PIPELINE, "--train.steps=6")
    local = run(2, data, tmp_path / "local", *PIPELINE, "--train.steps=6", *plain)
    assert_same_losses(synced, local, 6)
    assert read_metrics(local)[-1]["local_sgd_rounds"] == 6


def test_devices_in_one_process_give_the_losses_of_the_unplaced_model(data, tmp_path, one_rank):
    placed = run(1, data, tmp_path / "run", "--parallel.devices=['cpu', 'cpu']", "--parallel.micro_batches=2")
    assert_same_losses(one_rank, placed, 20)


@pytest.mark.parametrize("overrides", [
    ["--parallel.accum_steps=2", "--model.checkpoint_every=1", "--optim.name=lamb"],
    ["--optim.name=adafactor", "--parallel.stage_layers=[1, 1]", "--model.tie_weights=false"],
])
def test_stages_accumulate_checkpoint_activations_and_step_every_optimizer(data, tmp_path, overrides):
    reference = run(1, data, tmp_path / "one", "--train.steps=8", *overrides)
    piped = run(2, data, tmp_path / "piped", "--train.steps=8", *PIPELINE, *overrides)
    assert_same_losses(reference, piped, 8)


# bf16 autocast rounds each matmul's inputs: a pipeline's micro-batches of half the rows give
# other roundings than one rank's whole batch, so the curves agree to bf16's precision, not fp32's.
BF16_RELATIVE_TOLERANCE = 1e-2


def test_bf16_stages_give_the_losses_of_one_bf16_rank(data, tmp_path):
    bf16 = ["--train.steps=6", "--train.precision=bf16"]
    reference = run(1, data, tmp_path / "one", *bf16)
    piped = run(2, data, tmp_path / "run", *bf16, *PIPELINE)
    assert losses(piped)[-1] < losses(piped)[0]
    assert_same_losses(reference, piped, 6, rel=BF16_RELATIVE_TOLERANCE)


def test_stages_checkpoint_resume_exactly_and_generate_consolidates(data, tmp_path):
    straight = run(2, data, tmp_path / "straight", "--train.steps=12", "--checkpoint.every=4", *PIPELINE)
    folder = straight / "checkpoints"
    assert (folder / "step-00000008.stage-1.pt").is_file() and (folder / "step-00000008.pt").is_file()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for path in folder.glob("step-00000008*"):
        (resumed / "checkpoints" / path.name).write_bytes(path.read_bytes())
    run(2, data, resumed, "--train.steps=12", "--checkpoint.every=4", "--checkpoint.resume=auto", *PIPELINE)
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed)] == [(s, expected[s]) for s in range(9, 13)]
    sample = hvdllm("generate", "--checkpoint", str(straight), "--max-new-tokens", "8", "--temperature", "0")
    assert sample.returncode == 0 and "step 12" in sample.stderr, sample.stderr
    # Another layout takes these shards, re-sliced (tests/e2e/test_reshard.py checks its losses).
    other = hvdllm_mpi(2, *train_args(data, straight, "--train.steps=14", "--checkpoint.resume=auto"), timeout=120)
    assert other.returncode == 0, other.stderr
    assert "at step 12 (layout data 1, 2 pipeline stages of [1, 1] blocks -> data 2, one piece)" in other.stdout


@pytest.mark.parametrize("np, overrides, message", [
    (2, ["--parallel.pipeline=2", "--model.n_layer=1"], "parallel.pipeline asks for 2 stages but the model has 1"),
    (2, ["--parallel.pipeline=2", "--parallel.stage_layers=[1, 2]"], "sums to 3, but the model has 2 blocks"),
    (2, ["--parallel.pipeline=2", "--parallel.micro_batches=3"],
     "parallel.micro_batches=3 does not divide data.batch_size 4"),
    (1, ["--parallel.devices=['cpu', 'cuda:7']"], "device 'cuda:7'"),
    (2, ["--parallel.pipeline=3"], "2 launched ranks cannot hold parallel.pipeline=3 stages"),
])
def test_bad_layouts_are_one_line_on_every_rank(data, tmp_path, np, overrides, message):
    start = time.time()
    args = train_args(data, tmp_path / "run", *overrides)
    result = hvdllm(*args) if np == 1 else hvdllm_mpi(np, *args, timeout=120)
    lines = error_lines(result)
    assert result.returncode != 0 and len(lines) == np and len(set(lines)) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert time.time() - start < 90


def test_a_rank_killed_mid_pipeline_ends_the_job(data, tmp_path):
    args = train_args(data, tmp_path / "run", "--train.steps=100000", "--checkpoint.every=0",
                      "--train.eval_every=0", *PIPELINE)
    proc = subprocess.Popen(mpirun_command(2, ["-m", "hvdllm", *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    ranks = rank_pids(proc)
    assert len(ranks) == 2
    start = time.time()
    os.kill(ranks[0], signal.SIGKILL)  # the first stage: the last one waits for its activations
    try:
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.time() - start < 60
