"""One trial of ``hvdllm tune``: an ``hvdllm train`` job under ``mpirun`` in its own run
folder, its metrics.jsonl followed while it runs, every validation loss reported to Optuna,
and the job stopped when Optuna prunes the trial.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdllm.comm.launch import job_error_line, mpi_environment, mpirun_command
from hvdllm.paths import require_replaceable
from hvdllm.tune.space import override

LOG_NAME = "train.log"  # the job's stdout and stderr, in its run folder
# How long a stopped job may take to finish its step and write its checkpoint.
STOP_GRACE_S = 60.0


@dataclass
class TrialResult:
    state: str  # "complete" | "pruned" | "failed"
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    steps: int = 0  # the last step the job logged
    wall_s: float = 0.0
    error: str = ""  # for a failed trial: the job's error line

    @property
    def best_val_loss(self) -> float | None:
        return min((loss for _, loss in self.val_losses), default=None)


def train_command(ranks: int, config: str | None, overrides: list[str], params: dict[str, Any],
                  run_dir: Path) -> list[str]:
    """``mpirun -np ranks python -m hvdllm train --config ... <overrides> <params> --train.run_dir=...``."""
    argv = ["-m", "hvdllm", "train", *(["--config", config] if config else []), *overrides,
            *(override(key, value) for key, value in params.items()), f"--train.run_dir={run_dir}"]
    return mpirun_command(ranks, argv)


class MetricsFollower:
    """The records appended to a metrics.jsonl since the last call (complete lines only: the
    job may be writing the next one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _session_members(session: int) -> list[int]:
    """The processes of a session (Linux /proc): mpirun's ranks each get a process group of
    their own, but stay in the session the tuner started mpirun in."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if int(fields[3]) == session and int(entry.name) != os.getpid():
            members.append(int(entry.name))
    return members


def _kill_session(session: int) -> None:
    for pid in _session_members(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_job(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop an mpirun job and leave no process of it behind.

    SIGUSR1 first: mpirun forwards it to every rank, and hvdllm's trainer then finishes its
    step, writes a checkpoint and exits 0 (as on SIGTERM, but a SIGTERM to mpirun itself makes
    mpirun exit 1 whatever its ranks return). Then SIGTERM, then SIGKILL to the whole session.
    """
    try:
        for sig, wait_s in ((signal.SIGUSR1, grace_s), (signal.SIGTERM, 10.0)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
    finally:  # also when a second Ctrl-C cuts the wait short
        _kill_session(proc.pid)
        proc.wait()


def _end_with_the_tuner() -> None:
    """In the job's mpirun, before it starts (Linux): a SIGTERM when the tuner dies, even of
    SIGKILL, so that no training job outlives its tuner (mpirun forwards it to the ranks)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass  # not Linux: the job ends on its own


def _error_line(log: Path, returncode: int) -> str:
    return f"exit status {returncode}: {job_error_line(log.read_text(errors='replace'))}"


def run_trial(trial, command: list[str], run_dir: Path, poll_s: float = 0.2) -> TrialResult:
    """Run ``command`` (the trial's training job) writing into ``run_dir``, report its
    validation losses to ``trial`` (an optuna Trial) and stop it once the trial is pruned.
    A Ctrl-C (KeyboardInterrupt) stops the job too, and is raised again."""
    if run_dir.exists():  # left by a study whose storage no longer knows the trial
        require_replaceable(run_dir, "trial folder", True, [], lambda folder: (folder / LOG_NAME).is_file(),
                            "hvdllm tune trial folder")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    result = TrialResult("complete")
    started = time.monotonic()
    pruned = False
    with open(run_dir / LOG_NAME, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=mpi_environment(),
                                start_new_session=True, preexec_fn=_end_with_the_tuner)
        try:
            while True:
                running = proc.poll() is None
                reported = False
                for record in follower.new_records():
                    result.steps = max(result.steps, record["step"])
                    if record.get("val_loss") is not None:  # null: a non-finite loss
                        result.val_losses.append((record["step"], record["val_loss"]))
                        trial.report(record["val_loss"], record["step"])
                        reported = True
                if not running:
                    break
                if reported and not pruned and trial.should_prune():
                    pruned = True
                    stop_job(proc)
                    continue  # read what it logged while stopping
                time.sleep(poll_s)
        finally:
            stop_job(proc)
    result.wall_s = time.monotonic() - started
    if pruned:
        result.state = "pruned"
    elif proc.returncode != 0:
        result.state, result.error = "failed", _error_line(run_dir / LOG_NAME, proc.returncode)
    elif not result.val_losses:
        result.state = "failed"
        result.error = "no validation loss in metrics.jsonl (does the dataset have a validation split?)"
    return result
