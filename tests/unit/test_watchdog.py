"""The stall watchdog ends a process that completes no step in time, and only such a one;
Horovod's own stall check follows the same setting."""

import os
import subprocess
import sys
import time

from hvdllm.config import ParallelConfig, TrainConfig, load_config
from hvdllm.parallel import apply_horovod_environment, horovod_environment

CHILD = """
import sys, time
from hvdllm.train.watchdog import StallWatchdog
dog = StallWatchdog(timeout_s=1.0, rank=0, world_size=1)
for step in range(int(sys.argv[1])):  # steps of 0.2 s, each completed in time
    time.sleep(0.2)
    dog.beat(step + 1)
time.sleep(float(sys.argv[2]))  # then a hang
dog.close()
print("finished")
"""


def _child(steps: int, hang_s: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    result = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(hang_s)], capture_output=True, text=True,
                            timeout=60)
    return result, time.time() - start


def test_a_hang_ends_the_process_with_one_line():
    result, seconds = _child(steps=10, hang_s=30)
    assert result.returncode == 1 and "finished" not in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: stall: rank 0 of 1 completed step 10 and has waited ")
    assert line.endswith("for its own step (one rank: a hang inside it): a rank that is stopped, hung or on a dead "
                         "node is behind (train.stall_timeout_s=1); aborting the job")
    assert seconds < 20  # 2 s of steps, 1 s timeout checked every 0.25 s; a loaded machine is slower


def test_steps_in_time_keep_it_quiet():
    result, _ = _child(steps=15, hang_s=0.5)  # 3 s in all, far beyond the timeout, but never 1 s without a step
    assert result.returncode == 0 and result.stdout == "finished\n" and result.stderr == ""


def test_horovod_stall_check_follows_the_timeout():
    env = horovod_environment(ParallelConfig(), TrainConfig(stall_timeout_s=120))
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "60" and env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "240"
    off = horovod_environment(ParallelConfig(), TrainConfig(stall_timeout_s=0))
    assert "HOROVOD_STALL_CHECK_TIME_SECONDS" not in off and "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS" not in off


def test_a_strategy_sets_the_stall_knobs_of_its_config_before_horovod_starts(monkeypatch):
    monkeypatch.setattr("os.environ", {})  # the knobs land here, not in the test process's environment
    apply_horovod_environment(load_config(None, ["--train.stall_timeout_s=120"]))
    assert os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "60"
