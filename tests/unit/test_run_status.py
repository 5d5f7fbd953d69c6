"""A run's status.json and what `hvdllm report` makes of it: the exit status a launch script
passes on, whatever mpirun returned (under --enable-recovery it says 0 for a failed job)."""

import subprocess
import time

import pytest

from hvdllm.train.report import run_report
from hvdllm.train.status import FINISHED, PREEMPTED, RUNNING, RunStatus, end_job_left_running, read_status


@pytest.mark.parametrize("state, step, error, code, said", [
    (FINISHED, 20, "", 0, "status       finished at step 20"),
    (PREEMPTED, 7, "", 0, "status       preempted cleanly at step 7 (checkpoint written; resume with "
                          "--checkpoint.resume=auto)"),
    ("failed", None, "error: server 0: worker rank 0 sent nothing for 5 s", 1,
     "status       failed: error: server 0: worker rank 0 sent nothing for 5 s"),
])
def test_report_prints_the_status_and_exits_with_it(tmp_path, capsys, state, step, error, code, said):
    RunStatus(tmp_path).write(state, step, error)  # a run that ended before its first step: no metrics
    assert run_report(tmp_path, job_ended=True) == code
    assert capsys.readouterr().out.splitlines() == [said]


def test_a_job_that_ended_without_a_final_status_failed(tmp_path, capsys):
    RunStatus(tmp_path).write(RUNNING, 3)
    assert run_report(tmp_path) == 0  # a live run, as far as report alone knows
    assert run_report(tmp_path, job_ended=True) == 1
    assert "the job ended without saying how the run did (status.json still says running)" in capsys.readouterr().err
    RunStatus(tmp_path).write(FINISHED, 20)
    assert run_report(tmp_path, job_ended=True, since=time.time() + 60) == 1  # a previous job's status
    assert "(no status.json written by this job)" in capsys.readouterr().err


def test_an_unwritable_run_folder_loses_the_status_not_the_error(tmp_path):
    (tmp_path / "file").write_text("")
    RunStatus(tmp_path / "file" / "run").failed("error: something")  # no exception
    assert read_status(tmp_path / "file" / "run") is None


def test_a_launcher_that_outlives_the_run_is_ended(tmp_path):
    launcher = subprocess.Popen(["sleep", "60"])  # mpirun waiting for a stopped rank
    try:
        started = time.time()
        RunStatus(tmp_path).write(FINISHED, 20)
        end_job_left_running(tmp_path, launcher.pid, since=started - 1, grace_s=0.5, poll_s=0.1)
        assert launcher.wait(timeout=10) != 0 and time.time() - started < 5
    finally:
        launcher.kill()
        launcher.wait()
