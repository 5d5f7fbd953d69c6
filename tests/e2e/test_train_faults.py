"""Faults during `hvdllm train`: a stopped rank, SIGTERM at any moment of a step, a full disk."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.corpus import clean_env, error_lines, hvdllm, rank_pids, read_metrics, train_args

from hvdllm.comm.launch import mpirun_command
from hvdllm.train.checkpoint import load_checkpoint


def _launch(ranks: int, args: list[str]) -> tuple[subprocess.Popen, list[int]]:
    """Start `hvdllm ARGS` on 1 rank (a plain process) or under mpirun; returns it and the
    pids of its ranks."""
    argv = ["-m", "hvdllm", *args]
    cmd = mpirun_command(ranks, argv) if ranks > 1 else [sys.executable, *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    if ranks == 1:
        return proc, [proc.pid]
    deadline = time.time() + 60
    while time.time() < deadline:
        pids = rank_pids(proc)
        if len(pids) == ranks:
            return proc, pids
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the ranks did not start")


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while _logged_steps(run_dir) < count:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"fewer than {count} steps logged in {timeout} s"
        time.sleep(0.02)


def _end(pids: list[int], run_dir: Path) -> None:
    """Kill what a test may have stopped: SIGCONT first, or a stopped process ignores nothing
    but SIGKILL, and its launcher keeps waiting. Only processes of this run (their command
    line names its run folder): the pid of one that has ended may already belong to another."""
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(run_dir) in command:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    os.kill(pid, sig)
        except (FileNotFoundError, ProcessLookupError):
            pass


def test_stopped_rank_ends_the_job_with_one_line(data, tmp_path):
    args = train_args(data, tmp_path / "run", "--train.steps=100000", "--checkpoint.every=0",
                      "--train.eval_every=0", "--train.stall_timeout_s=8")
    proc, ranks = _launch(2, args)
    try:
        _wait_for_steps(tmp_path / "run", 3, proc)
        os.kill(_rank_pid(ranks, 1), signal.SIGSTOP)  # a hung node: alive, silent
        start = time.time()
        _, err = proc.communicate(timeout=150)
        ended_after = time.time() - start
    finally:
        _end([*ranks, proc.pid], tmp_path / "run")
        proc.communicate()
    assert proc.returncode != 0
    assert ended_after < 120  # 8 s timeout, checked every 2 s, plus the launcher's teardown
    assert "Traceback" not in err
    waiting = [line for line in err.splitlines() if line.startswith("error: stall: rank 0 of 2 completed step")]
    assert len(waiting) == 1, err[-3000:]
    assert "train.stall_timeout_s=8); aborting the job" in waiting[0]
    # When the launcher wakes the stopped rank to kill it, it may say that it was the one behind.
    woken = [line for line in err.splitlines() if line.startswith("error: stall: rank 1 of 2")]
    assert all("was itself frozen" in line for line in woken), woken


def _rank_pid(pids: list[int], rank: int) -> int:
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank} among {pids}")


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_at_random_moments_then_resume_is_exact(data, tmp_path, ranks):
    """Each interrupted run checkpoints the step the stop arrived in; resumed to the end,
    every step's loss is the straight run's, none missing, none twice."""
    steps = 150

    def args(run_dir, *extra):
        return train_args(data, run_dir, f"--train.steps={steps}", "--checkpoint.every=0", "--train.eval_every=0",
                          "--model.dropout=0.1", *extra)

    straight, _ = _launch(ranks, args(tmp_path / "straight"))
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    assert sorted(expected) == list(range(1, steps + 1))

    run_dir, rng = tmp_path / "stopped", random.Random(ranks)
    for round_index in range(2):
        resume = ["--checkpoint.resume=auto"] if round_index else []
        proc, pids = _launch(ranks, args(run_dir, *resume))
        try:
            _wait_for_steps(run_dir, _logged_steps(run_dir) + 15, proc)
            time.sleep(rng.uniform(0.0, 0.05))  # anywhere inside or between steps
            os.kill(rng.choice(pids), signal.SIGTERM)  # as a preemption reaching one task first
            out, err = proc.communicate(timeout=120)
        finally:
            _end([*pids, proc.pid], run_dir)
            proc.communicate()
        assert proc.returncode == 0, err
        assert "stop requested (SIGTERM or SIGUSR1)" in out
    final, _ = _launch(ranks, args(run_dir, "--checkpoint.resume=auto"))
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert {r["step"]: r["loss"] for r in records} == expected


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MiB file system (tmpfs, mounted as root): room for about two nano checkpoints
    (their temporary file included) and the run's small files."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"this test needs root to mount a tmpfs: {result.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_while_checkpointing_keeps_the_old_one_and_goes_on(data, small_disk):
    """A periodic checkpoint that does not fit is one line and training goes on (the next one
    tries again); if the last one does not fit either, the run exits 1: its end is not on disk."""
    run_dir = small_disk / "run"

    def args(steps, *extra):
        return train_args(data, run_dir, f"--train.steps={steps}", "--checkpoint.every=2", "--train.eval_every=0",
                          "--checkpoint.keep_best=false", "--checkpoint.keep_last=1", *extra)

    first = hvdllm(*args(6))
    kept = run_dir / "checkpoints" / "step-00000006.pt"
    assert first.returncode == 0 and kept.exists(), first.stderr
    stat = os.statvfs(small_disk)
    # Leave room for metrics lines, not for a checkpoint (~0.47 MB).
    (small_disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 200_000))
    again = hvdllm(*args(10, "--checkpoint.resume=auto"))
    assert again.returncode == 1, again.stderr
    assert "Traceback" not in again.stderr
    errors = error_lines(again)
    assert [line.split(" not written")[0] for line in errors] == [
        "error: rank 0: checkpoint of step 8", "error: rank 0: checkpoint of step 10"], again.stderr
    assert all(f"(No space left on device); kept: {kept}" in line for line in errors)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 11))  # it went on after step 8
    # No partial temporary file is left to keep the disk full.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [kept.name, kept.name + ".sha256"]
    assert load_checkpoint(kept)["step"] == 6  # whole, and its checksum matches
