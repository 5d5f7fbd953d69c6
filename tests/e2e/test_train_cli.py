"""End-to-end runs of `hvdllm train` through the CLI, on 1 rank and under mpirun -np 2."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.corpus import (clean_env, error_lines, hvdllm, hvdllm_mpi, losses, rank_pids, read_metrics,
                            train_args)

from hvdllm.comm.launch import mpirun_command


def assert_close(a, b, rel):
    assert len(a) == len(b) and a
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst < rel, worst


def test_a_global_batch_derives_accumulation_not_the_micro_batch(data, tmp_path):
    """data.batch_size is the micro-batch (Megatron, DeepSpeed): global 16 on 2 ranks of 4 is 2
    accumulation steps, said in the banner and trained as --parallel.accum_steps=2 trains."""
    derived = hvdllm_mpi(2, *train_args(data, tmp_path / "derived", "--train.steps=4", "--data.global_batch_size=16"))
    assert derived.returncode == 0, derived.stderr
    assert ("batch        16 samples x 32 tokens = 512 tokens per step (micro-batch 4 per rank x 2 accumulation "
            "x data 2)") in derived.stdout, derived.stdout
    assert "note " not in derived.stdout  # the global batch is held: no word about scaling
    explicit = hvdllm_mpi(2, *train_args(data, tmp_path / "explicit", "--train.steps=4", "--parallel.accum_steps=2"))
    assert explicit.returncode == 0, explicit.stderr
    assert_close(losses(tmp_path / "explicit"), losses(tmp_path / "derived"), 1e-6)
    # Without a global batch the world sets the tokens per step; with no lr scaling that is said once.
    notes = [line for line in explicit.stdout.splitlines() if line.startswith("note ")]
    assert len(notes) == 1 and "2 data-parallel ranks take 2x" in notes[0] and "schedule.scale_rule" in notes[0]


def test_two_ranks_equal_one_rank_double_batch(data, tmp_path):
    one = hvdllm(*train_args(data, tmp_path / "one", "--data.batch_size=8"))
    assert one.returncode == 0, one.stderr
    two = hvdllm_mpi(2, *train_args(data, tmp_path / "two", "--data.batch_size=4"))
    assert two.returncode == 0, two.stderr
    assert len(losses(tmp_path / "one")) == 20
    assert_close(losses(tmp_path / "one"), losses(tmp_path / "two"), 1e-5)
    val_one = [r["val_loss"] for r in read_metrics(tmp_path / "one") if "val_loss" in r]
    val_two = [r["val_loss"] for r in read_metrics(tmp_path / "two") if "val_loss" in r]
    assert_close(val_one, val_two, 1e-5)


def test_one_process_trains_without_horovod(data, tmp_path):
    """A single rank, whether plain or mpirun -np 1, must not pay for Horovod's background thread."""
    args = train_args(data, tmp_path / "run", "--train.steps=3")
    probe = ("import sys\nfrom hvdllm.cli import main\nrc = main(sys.argv[1:])\n"
             "print('horovod started' if 'horovod.torch' in sys.modules else 'horovod not started')\n"
             "sys.exit(rc)")
    plain = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=clean_env())
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[-1] == "horovod not started"
    one = subprocess.run(mpirun_command(1, ["-c", probe, *train_args(data, tmp_path / "one", "--train.steps=3")]),
                         capture_output=True, text=True, env=clean_env())
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[-1] == "horovod not started"
    assert [r["step"] for r in read_metrics(tmp_path / "one")] == [1, 2, 3]


def test_accumulation_equals_large_batch(data, tmp_path):
    big = hvdllm(*train_args(data, tmp_path / "big", "--data.batch_size=8"))
    acc = hvdllm(*train_args(data, tmp_path / "acc", "--data.batch_size=2", "--parallel.accum_steps=4"))
    assert big.returncode == 0 and acc.returncode == 0, acc.stderr
    assert_close(losses(tmp_path / "big"), losses(tmp_path / "acc"), 1e-5)


def test_resume_continues_exactly(data, tmp_path):
    common = ("--model.dropout=0.1", "--optim.name=lamb")  # dropout: the RNG state must come back too
    full = hvdllm_mpi(2, *train_args(data, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr
    # The state an interruption at step 10 leaves on disk: the step-10 checkpoint.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "step-00000010.pt", resumed)
    again = hvdllm_mpi(2, *train_args(data, tmp_path / "resumed", *common, "--checkpoint.resume=auto"))
    assert again.returncode == 0, again.stderr
    after = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in after] == list(range(11, 21))
    assert [r["loss"] for r in after] == losses(tmp_path / "full")[10:]


def test_fresh_run_refuses_to_overwrite_checkpoints(data, tmp_path):
    assert hvdllm(*train_args(data, tmp_path / "run", "--train.steps=2")).returncode == 0
    again = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=2"))
    assert again.returncode == 2 and "already holds checkpoints" in error_lines(again)[0]


def _wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _launch_long_run(data, run_dir):
    args = train_args(data, run_dir, "--train.steps=100000", "--checkpoint.every=0", "--train.eval_every=0")
    proc = subprocess.Popen(mpirun_command(2, ["-m", "hvdllm", *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    metrics = run_dir / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120)
    ranks = rank_pids(proc)
    assert len(ranks) == 2
    return proc, ranks


def test_sigterm_to_one_rank_checkpoints_and_exits_zero(data, tmp_path):
    proc, ranks = _launch_long_run(data, tmp_path / "run")
    os.kill(ranks[-1], signal.SIGTERM)  # as a preemption that reaches one task first
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stop requested (SIGTERM or SIGUSR1)" in out
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("-")[1])
    resumed = hvdllm(*train_args(data, tmp_path / "run", f"--train.steps={step + 2}", "--checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-2:] == [step + 1, step + 2]


def test_killed_rank_ends_the_job(data, tmp_path):
    proc, ranks = _launch_long_run(data, tmp_path / "run")
    start = time.time()
    os.kill(ranks[-1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - start < 60


@pytest.mark.parametrize("overrides, message", [
    (["--data.global_batch_size=7"], "data.global_batch_size 7 is not a multiple of data.batch_size 4 x 2 "
                                      "data-parallel rank(s) = 8"),
    (["--data.global_batch_size=16", "--parallel.accum_steps=4"],
     "data.global_batch_size 16 = data.batch_size 4 x 2 data-parallel rank(s) x 2 accumulation steps, but "
     "parallel.accum_steps is 4: set one of the two"),
    (["--model.block_size=16"], "data.seq_len 32 is above the model's context (model.block_size 16)"),
    (["--model.vocab_size=100"], "larger than model.vocab_size 100"),
    (["--data.path=/nonexistent/data"], "data folder /nonexistent/data does not exist"),
    (["--parallel.data=4"], "parallel.data=4 x parallel.pipeline=1 + parallel.servers=0 = 4 ranks, but the job "
                               "was launched with 2"),
    (["--parallel.data_parallel=2"], "parallel.data_parallel was replaced by parallel.data"),
    (["--checkpoint.resume=CORRUPT"], "corrupt or truncated checkpoint"),
    # Tens of TB: refused from its config before anything is built (it was built for minutes, RSS rising).
    (["--model.n_layer=100000", "--model.d_model=4096", "--model.n_head=32"],
     "model.n_layer=100000, model.d_model=4096 (20,137,"),
])
def test_bad_settings_fail_every_rank_before_any_collective(data, tmp_path, overrides, message):
    if "--checkpoint.resume=CORRUPT" in overrides:
        ok = hvdllm(*train_args(data, tmp_path / "src", "--train.steps=2"))
        assert ok.returncode == 0
        good = tmp_path / "src" / "checkpoints" / "step-00000002.pt"
        bad = tmp_path / "truncated.pt"
        bad.write_bytes(good.read_bytes()[:5000])
        overrides = [f"--checkpoint.resume={bad}"]
    start = time.time()
    result = hvdllm_mpi(2, *train_args(data, tmp_path / "run", *overrides), timeout=120)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr  # one line on every rank
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert time.time() - start < 90


def test_report_and_generate(data, tmp_path):
    run = tmp_path / "run"
    assert hvdllm(*train_args(data, run, "--log.plot=true", "--log.tensorboard=true")).returncode == 0
    assert (run / "training.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    (run / "training.png").unlink()
    report = hvdllm("report", str(run))
    assert report.returncode == 0 and "val loss" in report.stdout and (run / "training.png").exists()
    record = read_metrics(run)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "mem_peak_bytes",
                "val_loss", "val_ppl", "val_acc"):
        assert key in record, key
    assert math.isclose(record["val_ppl"], math.exp(record["val_loss"]), rel_tol=1e-6)
    out = hvdllm("generate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--prompt", "Alpha",
                 "--max-new-tokens", "20", "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("Alpha")
    assert len(out.stdout.rstrip("\n")) == len("Alpha") + 20  # byte tokens: one character each


def test_horovodrun_gloo_matches_mpirun(data, tmp_path):
    """The same run under Horovod's Gloo controller (horovodrun --gloo) and under mpirun."""
    args = train_args(data, tmp_path / "gloo", "--data.batch_size=4", "--train.steps=8")
    gloo = subprocess.run([str(Path(sys.executable).parent / "horovodrun"), "--gloo",
                           "-np", "2", "-H", "localhost:2", sys.executable, "-m", "hvdllm", *args],
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert gloo.returncode == 0, gloo.stderr[-2000:]
    mpi = hvdllm_mpi(2, *train_args(data, tmp_path / "mpi", "--data.batch_size=4", "--train.steps=8"))
    assert mpi.returncode == 0, mpi.stderr
    assert_close(losses(tmp_path / "gloo"), losses(tmp_path / "mpi"), 1e-5)
