"""Across hosts for real: 3 test hosts (tests/multihost/hosts.sh: network namespaces with
their own hostnames and sshd), jobs launched from hostA with ``mpirun -H`` and ``horovodrun
-H`` over ssh. Training gives the losses of the single-host 2-rank run; each rank's host is
in the run's log; ``hvdllm bench comm`` runs across them; a host whose link goes down ends
the job within a bounded time; under Horovod elastic a host leaves and one joins, and
training goes on. scripts/test.sh runs this tier only where hosts.sh can."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.corpus import clean_env, hvdllm_mpi, read_metrics, train_args

HOSTS_SH = Path(__file__).parent / "hosts.sh"
ACROSS = "hostA:1,hostB:1"
# What ranks that ssh starts on the other hosts must see too: running as root, and torch's
# Inductor cache in pytest's folder (tests/conftest.py), or every rank makes one in /tmp.
FORWARDED_VARIABLES = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "TORCHINDUCTOR_CACHE_DIR"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    state = tmp_path_factory.mktemp("hosts")
    # A near-empty environment; Inductor's cache stays in pytest's folder (tests/conftest.py).
    env = clean_env({"MH_STATE": str(state), "TORCHINDUCTOR_CACHE_DIR": os.environ["TORCHINDUCTOR_CACHE_DIR"]})
    up = subprocess.run(["bash", str(HOSTS_SH), "up", "3"], capture_output=True, text=True, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        yield env
    finally:
        subprocess.run(["bash", str(HOSTS_SH), "down"], env=env, timeout=120)


def on_host(hosts_env, host: str, command: list[str], timeout: int = 240, **kwargs):
    """``command`` started inside ``host`` (the root namespace has no route to the test subnet)."""
    return subprocess.run(["bash", str(HOSTS_SH), "run", host, *command], capture_output=True, text=True,
                          env=hosts_env, timeout=timeout, **kwargs)


def start_on_host(hosts_env, command: list[str], limit_s: int, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``command`` started on hostA in the background, killed by ``timeout`` after ``limit_s``."""
    return subprocess.Popen(["bash", str(HOSTS_SH), "run", "hostA", "timeout", "-k", "5", str(limit_s), *command],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=hosts_env)


def mpirun_across(*args: str) -> list[str]:
    exports = [flag for name in FORWARDED_VARIABLES for flag in ("-x", name)]
    return ["mpirun", "-np", "2", "-H", ACROSS, "--bind-to", "none", *exports, sys.executable, *args]


def horovodrun_across(controller: str, *args: str) -> list[str]:
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    return [horovodrun, "-np", "2", "-H", ACROSS, controller, "--network-interface", "mh0", "--disable-cache",
            sys.executable, *args]


@pytest.fixture(scope="module")
def single_host_losses(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = hvdllm_mpi(2, *train_args(data, run_dir, "--train.steps=6"), timeout=240)
    assert result.returncode == 0, result.stderr
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun --mpi", "horovodrun --gloo"])
def test_training_across_hosts_gives_the_single_host_losses(hosts, data, single_host_losses, tmp_path, launcher):
    args = ["-m", "hvdllm", *train_args(data, tmp_path / "run", "--train.steps=6")]
    command = mpirun_across(*args) if launcher == "mpirun" else horovodrun_across(launcher.split()[1], *args)
    result = on_host(hosts, "hostA", command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hosts        hostA: rank 0; hostB: rank 1" in result.stdout, result.stdout
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses == pytest.approx(single_host_losses, rel=1e-6, abs=0)


def test_bench_comm_across_hosts(hosts, tmp_path):
    out = tmp_path / "comm.json"
    result = on_host(hosts, "hostA", mpirun_across("-m", "hvdllm", "bench", "comm", "--sizes", "1KB:64KB",
                                                   "--backends", "mpi4py,horovod-mpi", "--no-plot",
                                                   "--json", str(out)))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["hosts"] == ["hostA", "hostB"] and report["np"] == 2
    assert {r["backend"] for r in report["records"]} == {"mpi4py", "horovod-mpi"}
    assert all(r["correct"] for r in report["records"])


def test_a_host_whose_link_goes_down_ends_the_job_within_a_bounded_time(hosts, data, tmp_path):
    """ssh keepalive (5 s x 3, in the hosts' ssh config) lets mpirun notice the lost host, and
    ssh says which it was."""
    run_dir = tmp_path / "run"
    args = ["-m", "hvdllm", *train_args(data, run_dir, "--train.steps=100000", "--log.every=100000",
                                        "--checkpoint.every=0")]
    proc = start_on_host(hosts, mpirun_across(*args), limit_s=200)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "config.toml").exists():
            time.sleep(0.2)
        time.sleep(3)  # well into training
        assert proc.poll() is None, proc.communicate()
        subprocess.run(["bash", str(HOSTS_SH), "link", "hostB", "down"], env=hosts, check=True)
        cut = time.time()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        subprocess.run(["bash", str(HOSTS_SH), "link", "hostB", "up"], env=hosts, check=False)
    assert proc.returncode not in (0, 124, 137) and time.time() - cut < 60, stderr[-2000:]
    assert "timeout, server hostb not responding" in stderr.lower(), stderr[-2000:]  # ssh names the host


def test_killed_processes_on_a_host_end_the_job_naming_the_host(hosts, data, tmp_path):
    run_dir = tmp_path / "run"
    args = ["-m", "hvdllm", *train_args(data, run_dir, "--train.steps=100000", "--checkpoint.every=0")]
    proc = start_on_host(hosts, mpirun_across(*args), limit_s=200)
    try:
        wait_for_step(run_dir, 3)
        on_b = subprocess.run(["bash", str(HOSTS_SH), "pids", "hostB"], capture_output=True, text=True,
                              env=hosts).stdout.split()
        rank = [pid for pid in on_b if is_training_process(pid)]
        assert len(rank) == 1, rank
        os.kill(int(rank[0]), signal.SIGKILL)
        killed = time.time()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.time() - killed < 30, stderr[-2000:]  # mpirun's own end, not timeout's
    assert "process rank 1 with PID" in stderr and "on node hostB exited on signal 9" in stderr, stderr[-2000:]


def start_elastic(hosts, data, tmp_path, steps, *overrides):
    """horovodrun's elastic mode on hostA..hostC, from a discovery script that prints the
    file it returns; global batch 12 (4 samples per rank on 3 workers, 6 on 2)."""
    listed = tmp_path / "hosts.txt"
    listed.write_text("hostA:1\nhostB:1\nhostC:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {listed}\n")
    discover.chmod(0o755)
    args = train_args(data, tmp_path / "run", f"--train.steps={steps}", "--parallel.elastic=true",
                      "--data.global_batch_size=12", "--checkpoint.every=0", "--train.eval_every=0",
                      "--train.slowdown_rank=0", "--train.slowdown_factor=15", *overrides)
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    command = [horovodrun, "-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script", str(discover),
               "--network-interface", "mh0", "--disable-cache", sys.executable, "-m", "hvdllm", *args]
    proc = start_on_host(hosts, command, limit_s=280, stderr=subprocess.STDOUT)
    return proc, listed


def check_every_step_once(output, run_dir, steps):
    records = read_metrics(run_dir)
    assert sorted(r["step"] for r in records) == list(range(1, steps + 1)), output[-3000:]
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]


def test_elastic_goes_on_when_a_host_leaves_and_when_one_joins(hosts, data, tmp_path):
    """hostC is taken out of the discovery mid-run: the two others go on from the commit
    (every step here) with 6 samples each and the lr of 2 workers; it is put back: it joins,
    gets the state and takes its 4. Every step is done once."""
    steps = 300
    proc, listed = start_elastic(hosts, data, tmp_path, steps, "--parallel.elastic_commit_every=1",
                                 "--optim.lr=1e-3", "--schedule.scale_rule=linear")
    try:
        wait_for_step(tmp_path / "run", 30)
        listed.write_text("hostA:1\nhostB:1\n")
        wait_for_step(tmp_path / "run", newest_step(tmp_path / "run") + 60)
        listed.write_text("hostA:1\nhostB:1\nhostC:1\n")
        output, _ = proc.communicate(timeout=280)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    shrunk = output.index("elastic: 2 workers from step")
    assert int(output[shrunk:].split()[5]) >= 30  # from where they were: they had just committed
    assert "6 samples per rank, lr 0.002" in output[shrunk:shrunk + 200]  # lr x workers (scale_rule)
    grown = output.index("elastic: 3 workers from step", shrunk)
    assert "4 samples per rank, lr 0.003" in output[grown:grown + 200], output[-4000:]
    check_every_step_once(output, tmp_path / "run", steps)


def test_elastic_goes_on_from_the_last_commit_when_a_worker_dies(hosts, data, tmp_path):
    """hostC's worker is killed: the others' next collective fails, they take back the last
    commit (every 5 steps), re-form on hostA and hostB and go on; the steps after the commit
    are done again, and the log keeps each step once."""
    steps = 200
    proc, _ = start_elastic(hosts, data, tmp_path, steps, "--parallel.elastic_commit_every=5")
    try:
        wait_for_step(tmp_path / "run", 20)
        on_c = subprocess.run(["bash", str(HOSTS_SH), "pids", "hostC"], capture_output=True, text=True,
                              env=hosts).stdout.split()
        worker = [pid for pid in on_c if is_training_process(pid)]
        assert len(worker) == 1, worker
        os.kill(int(worker[0]), signal.SIGKILL)
        output, _ = proc.communicate(timeout=280)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    resumed = output.index("elastic: 2 workers from step ")
    commit = int(output[resumed:].split()[5])
    assert commit % 5 == 0 and commit >= 20 and "6 samples per rank" in output[resumed:resumed + 200], output[-4000:]
    check_every_step_once(output, tmp_path / "run", steps)


def is_training_process(pid: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[0].endswith(b"python") and argv[1:4] == [b"-m", b"hvdllm", b"train"]


def newest_step(run_dir) -> int:
    """The newest step in ``run_dir``'s metrics (0 before the first)."""
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    complete = text[:text.rfind("\n") + 1].splitlines()  # not a line still being written
    return json.loads(complete[-1])["step"] if complete else 0


def wait_for_step(run_dir, step, within_s=200) -> int:
    deadline = time.time() + within_s
    while newest_step(run_dir) < step:
        assert time.time() < deadline, f"step {step} not reached in {within_s} s (at {newest_step(run_dir)})"
        time.sleep(0.2)
    return newest_step(run_dir)
