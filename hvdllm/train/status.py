"""A run's status marker, ``RUN_DIR/status.json``: running, finished, preempted or failed (with
the error line), written atomically by the rank that knows.

It exists because a launcher's exit status can lie: under ``mpirun --enable-recovery`` (which
parallel.continue_without_dead needs) Open MPI returns 0 even after MPI_Abort(1) or a rank's
sys.exit(3), and a SIGTERM to mpirun gives 1 for a clean preemption. ``hvdllm report`` and the
mpi_launch/ scripts read this file and turn it into an exit status that tells the truth.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from hvdllm.atomic import write_json_atomic

STATUS_NAME = "status.json"
RUNNING, FINISHED, PREEMPTED, FAILED = "running", "finished", "preempted", "failed"
# States after which no rank of the job trains any more.
FINAL = (FINISHED, PREEMPTED, FAILED)


class RunStatus:
    """The marker of one run folder; every write replaces the whole file."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / STATUS_NAME

    def write(self, state: str, step: int | None = None, error: str = "") -> None:
        """Best effort: a run folder that cannot be written must not hide the error being
        recorded (the rank's own line on stderr still says it)."""
        record = {"state": state, "step": step, "error": error, "time": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, record)
        except OSError:
            pass

    def failed(self, line: str) -> None:
        self.write(FAILED, error=line)


def read_status(run_dir: str | Path) -> dict | None:
    """The run's status record, or None when there is none (a run from before the marker, or
    one that ended before writing it) or it is not a status record."""
    try:
        record = json.loads((Path(run_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in (RUNNING, *FINAL) else None


def describe_status(record: dict) -> str:
    """The status in a phrase, as ``hvdllm report`` prints it."""
    state, step = record["state"], record.get("step")
    if state == PREEMPTED:
        return f"preempted cleanly at step {step} (checkpoint written; resume with --checkpoint.resume=auto)"
    if state == FINISHED:
        return f"finished at step {step}"
    if state == FAILED:
        return f"failed: {record.get('error') or 'no error line recorded'}"
    return "running" + (f" (step {step} when last written)" if step is not None else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def end_job_left_running(run_dir: str | Path, pid: int, since: float, grace_s: float, poll_s: float = 2.0) -> None:
    """For launch scripts: wait while process ``pid`` (the job's mpirun) runs, and end it if it
    still runs ``grace_s`` after the status written since ``since`` became final. Under
    ``mpirun --enable-recovery`` a rank the job went on without (parallel.continue_without_dead)
    that is stopped, not dead, never exits, and mpirun waits for it for ever, holding the
    allocation; a SIGTERM makes mpirun end every rank left."""
    over_at = None
    while _alive(pid):
        status = read_status(run_dir)
        if status is None or status["state"] not in FINAL or status.get("time", 0.0) < since:
            over_at = None
        elif over_at is None:
            over_at = time.monotonic()
        elif time.monotonic() - over_at > grace_s:
            print(f"warning: {run_dir}: the run is {status['state']} but its job still runs {grace_s:g} s later "
                  f"(a rank it went on without is stopped or hung): ending it", file=sys.stderr, flush=True)
            os.kill(pid, signal.SIGTERM)
            return
        time.sleep(poll_s)
