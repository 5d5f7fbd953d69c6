"""Stopping a 2-rank run from outside ends it cleanly: every rank checkpoints and the launcher
exits 0, whether the signal goes to mpirun (SIGUSR1, which it forwards) or to the launch script
(SIGTERM, as a batch system or a user sends it); `hvdllm report` says it was preempted cleanly
at the checkpoint's step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.corpus import clean_env, hvdllm, train_args

from hvdllm.comm.launch import mpirun_command

ROOT = Path(__file__).resolve().parents[2]


def long_run(data, run_dir) -> list[str]:
    return train_args(data, run_dir, "--train.steps=100000", "--checkpoint.every=0", "--train.eval_every=0")[1:]


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps logged in {timeout} s")


def stop_and_check(proc: subprocess.Popen, sig: int, run_dir: Path) -> str:
    """Stop the run with ``sig`` to ``proc``; returns the launcher's stdout."""
    wait_for_steps(run_dir, 3)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested" in out
    (checkpoint,) = (run_dir / "checkpoints").glob("step-*.pt")
    step = int(checkpoint.stem.split("-")[1])
    report = hvdllm("report", "--job-ended", str(run_dir))
    assert report.returncode == 0 and f"status       preempted cleanly at step {step} " in report.stdout, report
    return out


def test_sigusr1_to_mpirun_stops_every_rank_with_exit_zero(data, tmp_path):
    proc = subprocess.Popen(mpirun_command(2, ["-m", "hvdllm", "train", *long_run(data, tmp_path / "run")]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    stop_and_check(proc, signal.SIGUSR1, tmp_path / "run")


def test_sigterm_to_the_mpirun_script_stops_with_exit_zero(data, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    env = clean_env(dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    args = long_run(data, tmp_path / "run")  # --config NANO ... overrides: passed through by the script
    proc = subprocess.Popen(["bash", str(ROOT / "mpi_launch" / "mpirun.sh"), "2", str(hostfile), *args[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = stop_and_check(proc, signal.SIGTERM, tmp_path / "run")
    assert "status       preempted cleanly at step" in out  # the script's own report
