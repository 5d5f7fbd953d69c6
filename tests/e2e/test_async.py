"""The parameter server through the CLI: with max_staleness 0 it gives the losses of `sync`
for the same global batch (one or two servers, AdamW and LAMB); with s > 0 and one worker
slowed, no applied push is staler than s, and a server's update count is its applied pushes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.corpus import clean_env, error_lines, hvdllm, hvdllm_mpi, losses, rank_pids, read_metrics, train_args

from hvdllm.comm.launch import mpirun_command

ASYNC = ["--parallel.strategy=async"]


def run(np, data, run_dir, *overrides):
    result = hvdllm_mpi(np, *train_args(data, run_dir, "--checkpoint.every=0", *overrides), timeout=240)
    assert result.returncode == 0, result.stderr
    return run_dir


def val_losses(run_dir):
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


def server_summary(run_dir, index=0):
    return json.loads((run_dir / "servers" / f"server-{index}.json").read_text())


@pytest.mark.parametrize("servers, optimizer", [(1, "lamb"), (2, "adamw")])
def test_zero_staleness_gives_the_losses_of_sync(data, tmp_path, servers, optimizer):
    steps = ["--train.steps=8", f"--optim.name={optimizer}"]
    sync = run(2, data, tmp_path / "sync", *steps)
    ps = run(2 + servers, data, tmp_path / "ps", *ASYNC, f"--parallel.servers={servers}", *steps)
    a, b = losses(sync), losses(ps)
    assert len(a) == len(b) == 8 and a[-1] < a[0]
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5, (a, b)
    val_a, val_b = val_losses(sync), val_losses(ps)
    assert len(val_a) == len(val_b) >= 1 and max(abs(x - y) / abs(x) for x, y in zip(val_a, val_b)) < 1e-5
    for index in range(servers):  # every push reached every shard, one update per clock
        summary = server_summary(ps, index)
        assert summary["updates"] == 8 and summary["applied_pushes"] == 16 and summary["staleness_hist"] == [16]


def test_load_balance_gives_a_slowed_worker_fewer_samples_and_the_losses_of_sync(data, tmp_path):
    steps = ["--train.steps=8"]
    sync = run(2, data, tmp_path / "sync", *steps)
    balanced = run(3, data, tmp_path / "balanced", *ASYNC, "--parallel.servers=1", "--parallel.load_balance=true",
                   "--train.slowdown_rank=1", "--train.slowdown_factor=4", *steps)
    a, b = losses(sync), losses(balanced)
    assert len(a) == len(b) == 8 and a[-1] < a[0]
    # The same global batches and means; only the order of the float sums differs.
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-4, (a, b)
    val_a, val_b = val_losses(sync), val_losses(balanced)
    assert len(val_a) == len(val_b) >= 1 and max(abs(x - y) / abs(x) for x, y in zip(val_a, val_b)) < 1e-4
    samples = server_summary(balanced)["samples_per_worker"]
    assert sum(samples) == 8 * 2 * 4  # every sample of every global batch, once
    assert samples[1] < samples[0] / 2, samples  # the worker 4x slower computed far fewer of them


def test_staleness_never_exceeds_the_bound_with_a_slow_worker(data, tmp_path):
    ps = run(3, data, tmp_path / "ps", *ASYNC, "--parallel.servers=1", "--parallel.max_staleness=2",
             "--train.steps=16", "--train.slowdown_rank=1", "--train.slowdown_factor=6", "--train.eval_every=4")
    summary = server_summary(ps)
    hist = summary["staleness_hist"]
    assert len(hist) == 3 and hist[2] > 0  # the fast worker ran ahead, up to the bound
    assert summary["updates"] == summary["applied_pushes"] == sum(hist) == 32 - summary["dropped_pushes"]
    assert summary["pushes_per_worker"] == [16, 16]
    records = read_metrics(ps)
    # The logging worker's view: the server's histogram so far, and its own pulls' staleness.
    assert all(seen <= final for seen, final in zip(records[-1]["staleness_hist"], hist))
    assert max(r["staleness"] for r in records) <= 2
    assert losses(ps)[-1] < losses(ps)[0]
    # Both workers evaluated the servers' weights at each evaluation step: a snapshot of a
    # clock within the bound of the step (the slowed worker's pushes may still be missing).
    evaluated = [(r["step"], r["val_clock"]) for r in records if "val_loss" in r]
    assert [step for step, _ in evaluated] == [4, 8, 12, 16]
    assert all(step - 2 <= clock <= step for step, clock in evaluated), evaluated


@pytest.mark.parametrize("np, overrides, message", [
    (2, ["--parallel.strategy=async"], "parallel.strategy=async needs parameter servers"),
    (3, ["--parallel.servers=1"], "parallel.servers=1 needs an asynchronous parallel.strategy"),
    (3, ["--parallel.strategy=async", "--parallel.servers=1", "--parallel.pipeline=2"],
     "parallel.strategy=async pushes whole-model gradients"),
    (3, ["--parallel.strategy=async", "--parallel.servers=1", "--parallel.continue_without_dead=true"],
     "parallel.continue_without_dead: this mpirun kills every rank when one dies; launch with mpirun "
     "--enable-recovery"),
])
def test_bad_async_layouts_are_one_line_on_every_rank(data, tmp_path, np, overrides, message):
    start = time.time()
    result = hvdllm_mpi(np, *train_args(data, tmp_path / "run", *overrides), timeout=120)
    lines = error_lines(result)
    assert result.returncode != 0 and len(lines) == np and len(set(lines)) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert time.time() - start < 90


def start_long_run(data, run_dir, *overrides, np=3, recovery=False):
    """An endless async run (2 workers or more, 1 server), returned once it has logged 3 steps;
    ``recovery``: under ``mpirun --enable-recovery`` (a dead rank does not end the others)."""
    args = train_args(data, run_dir, *ASYNC, "--parallel.servers=1", "--parallel.max_staleness=1",
                      "--train.steps=100000", "--train.eval_every=0", "--checkpoint.every=0", *overrides)
    command = mpirun_command(np, ["-m", "hvdllm", *args])
    if recovery:
        command.insert(1, "--enable-recovery")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    wait_for_steps(run_dir, 3)
    return proc


def wait_for_steps(run_dir, count, within_s=120):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + within_s
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        time.sleep(0.2)
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def end_job(proc):
    """Leave nothing behind, whatever the test saw: the ranks (a stopped one too), then mpirun."""
    for pid in rank_pids(proc):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended between the listing and the kill
    proc.kill()
    proc.wait()


def signal_rank_and_wait(proc, rank, sig) -> tuple[str, float]:
    """Send ``sig`` to one rank of the job, wait (120 s at most) for mpirun to end, and leave
    nothing behind: (mpirun's stderr, seconds from the signal to the end)."""
    try:
        os.kill(rank_pids(proc)[rank], sig)
        start = time.time()
        _, stderr = proc.communicate(timeout=120)
    finally:
        end_job(proc)
    return stderr, time.time() - start


@pytest.mark.parametrize("victim", [1, 2], ids=["worker", "server"])
def test_a_killed_worker_or_server_ends_the_job_naming_it(data, tmp_path, victim):
    proc = start_long_run(data, tmp_path / "run")
    assert len(rank_pids(proc)) == 3  # ranks 0, 1 (workers), 2 (server)
    stderr, seconds = signal_rank_and_wait(proc, victim, signal.SIGKILL)
    assert proc.returncode != 0 and seconds < 60
    assert f"process rank {victim} with PID" in stderr and "signal 9" in stderr, stderr  # mpirun names it


TIMEOUT = "--parallel.worker_timeout_s=5"


@pytest.mark.parametrize("settings", [["--parallel.max_staleness=0"], ["--parallel.max_staleness=2"],
                                      ["--parallel.max_staleness=0", "--parallel.load_balance=true"]],
                         ids=["s0", "s2", "s0-load-balance"])
def test_continue_without_dead_goes_on_with_the_live_workers(data, tmp_path, settings):
    """3 workers, 1 server, under mpirun --enable-recovery: worker 2 is killed; the server
    names it after the timeout and the other two train on (the dead one no longer holds the
    clocks back), then stop on SIGUSR1 with a checkpoint gathered from the two. With
    load_balance the two then compute the whole of each global batch between them."""
    run_dir = tmp_path / "run"
    proc = start_long_run(data, run_dir, TIMEOUT, "--parallel.continue_without_dead=true", *settings, np=4,
                          recovery=True)
    try:
        os.kill(rank_pids(proc)[2], signal.SIGKILL)
        killed_at = wait_for_steps(run_dir, 0)
        assert wait_for_steps(run_dir, killed_at + 20, within_s=60) >= killed_at + 20  # it went on
        os.kill(proc.pid, signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        end_job(proc)
    assert proc.returncode == 0, stderr
    assert "warning: server 0: worker rank 2 sent nothing for 5 s: going on with 2 workers" in stderr, stderr
    summary = server_summary(run_dir)
    last = read_metrics(run_dir)[-1]
    assert summary["dead_workers"] == [2] and last["dead_workers"] == 1
    pushes = summary["pushes_per_worker"]
    assert pushes[0] == pushes[1] == last["step"] and pushes[2] < last["step"] - 15
    global_batch = 3 * 4
    # Without balancing the dead worker's slice of every later clock is lost; with it, at
    # most its span of the clock it died in.
    lost = last["step"] * global_batch - sum(summary["samples_per_worker"])
    assert 0 < lost < global_batch if "--parallel.load_balance=true" in settings else lost > 15 * 4
    state = torch.load(run_dir / "checkpoints" / f"step-{last['step']:08d}.pt", weights_only=False)
    assert len(state["rng"]["ranks"]) == 2  # gathered from the live workers only


def test_a_stopped_worker_left_behind_does_not_hold_the_launch_script(data, tmp_path):
    """mpirun --enable-recovery waits for every rank, also a stopped one the job went on
    without: training finishes, yet mpirun would never exit (holding a batch allocation). The
    launch script ends it once status.json says finished, and exits 0 with the run's status."""
    run_dir, hostfile = tmp_path / "run", tmp_path / "hosts"
    hostfile.write_text("localhost slots=3\n")
    args = train_args(data, run_dir, *ASYNC, "--parallel.servers=1", "--parallel.max_staleness=1", TIMEOUT,
                      "--parallel.continue_without_dead=true", "--train.steps=60", "--train.eval_every=0",
                      "--checkpoint.every=0")
    env = clean_env(dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                         MPIRUN_FLAGS="--enable-recovery", HVDLLM_END_GRACE_S="3"))
    script = Path(__file__).resolve().parents[2] / "mpi_launch" / "mpirun.sh"
    proc = subprocess.Popen(["bash", str(script), "3", str(hostfile), *args[2:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    stopped = None
    try:
        wait_for_steps(run_dir, 3)
        mpirun = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "mpirun"], capture_output=True, text=True)
        stopped = rank_pids(int(mpirun.stdout))[1]
        os.kill(stopped, signal.SIGSTOP)
        out, err = proc.communicate(timeout=120)
        left_behind = Path(f"/proc/{stopped}").exists()
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    # 1 worker goes on, or none when the other had already finished its steps (a loaded machine).
    assert re.search(r"warning: server 0: worker rank 1 sent nothing for 5 s: going on with [01] workers", err), \
        err[-3000:]
    assert "but its job still runs 3 s later (a rank it went on without is stopped or hung): ending it" in err
    assert "status       finished at step 60" in out, out[-2000:]
    assert not left_behind  # mpirun ended the stopped rank too


def test_without_worker_0_the_job_ends_even_under_recovery(data, tmp_path):
    """Worker 0 writes the log and checkpoints: its death ends the job also where MPI_Abort
    ends only the caller (--enable-recovery): the server tells the other workers to exit.
    mpirun's exit status may say 0 there; the run folder's status.json, and `hvdllm report`'s
    exit status from it, say the run failed and why."""
    run_dir = tmp_path / "run"
    proc = start_long_run(data, run_dir, TIMEOUT, "--parallel.continue_without_dead=true", np=4, recovery=True)
    stderr, seconds = signal_rank_and_wait(proc, 0, signal.SIGKILL)
    assert seconds < 60
    line = ("error: server 0: worker rank 0 sent nothing for 5 s (parallel.worker_timeout_s): dead or stopped; "
            "ending the job (worker 0 writes the log and checkpoints)")
    assert line in stderr, stderr
    assert stderr.count("a parameter server ended the job") == 2, stderr
    assert json.loads((run_dir / "status.json").read_text())["error"] == line
    report = hvdllm("report", "--job-ended", str(run_dir))
    assert report.returncode == 1 and f"status       failed: {line}" in report.stdout, report.stdout


def test_a_stopped_worker_ends_the_job_naming_it(data, tmp_path):
    """A SIGSTOPped worker does not die, so mpirun does not notice; it is silent, and the
    server ends the job after parallel.worker_timeout_s (not the 600 s stall watchdog)."""
    proc = start_long_run(data, tmp_path / "run", TIMEOUT)
    stderr, seconds = signal_rank_and_wait(proc, 1, signal.SIGSTOP)
    assert proc.returncode != 0 and seconds < 60
    assert "error: server 0: worker rank 1 sent nothing for 5 s (parallel.worker_timeout_s): dead or stopped; " \
           "ending the job" in stderr, stderr


def test_a_stopped_server_ends_the_job_naming_it(data, tmp_path):
    """A SIGSTOPped server: the workers' stall watchdog ends the job naming the server they
    wait for and their own role, not "the other ranks" (the other workers are not to blame)."""
    proc = start_long_run(data, tmp_path / "run", "--train.stall_timeout_s=4")
    stderr, seconds = signal_rank_and_wait(proc, 2, signal.SIGSTOP)
    assert seconds < 60
    assert re.search(r"error: stall: rank [01] of 3 \(worker\) completed step", stderr), stderr  # either worker
    assert "for parameter server rank 2: a rank that is stopped, hung or on a dead node is behind" in stderr, stderr


def test_sigusr1_stops_workers_at_one_clock_checkpoints_and_ends_the_servers(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_long_run(data, run_dir)
    os.kill(proc.pid, signal.SIGUSR1)  # mpirun forwards it to every rank
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        end_job(proc)
    assert proc.returncode == 0, stderr
    last = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step-{last:08d}.pt").is_file()
    assert server_summary(run_dir)["pushes_per_worker"] == [last, last]  # both stopped at the same clock


def test_zero_staleness_checkpoints_server_shards_and_resumes_exactly(data, tmp_path):
    common = [*ASYNC, "--parallel.servers=2", "--train.steps=12", "--checkpoint.every=4"]
    straight = run(4, data, tmp_path / "straight", *common)
    folder = straight / "checkpoints"
    assert {p.name for p in folder.glob("step-00000008*.pt")} == {
        "step-00000008.pt", "step-00000008.stage-1000.pt", "step-00000008.stage-1001.pt"}
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for path in folder.glob("step-00000008*"):
        (resumed / "checkpoints" / path.name).write_bytes(path.read_bytes())
    run(4, data, resumed, *common, "--checkpoint.resume=auto")
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed)] == [(s, expected[s]) for s in range(9, 13)]
    assert server_summary(resumed)["updates"] == server_summary(straight)["updates"] == 12
