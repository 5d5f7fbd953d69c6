"""Across hosts for real: 2 test hosts (tests/multihost/hosts.sh: network namespaces with
their own hostnames and sshd), jobs launched from hostA with ``mpirun -H`` and ``horovodrun
-H`` over ssh. Training gives the losses of the single-host 2-rank run; each rank's host is
in the run's log; ``hvdllm bench comm`` runs across them; a host whose link goes down ends
the job within a bounded time. scripts/test.sh runs this tier only where hosts.sh can."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.corpus import clean_env, hvdllm_mpi, make_dataset, read_metrics, train_args

HOSTS_SH = Path(__file__).parent / "hosts.sh"
ACROSS = "hostA:1,hostB:1"
ROOT_VARIABLES = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    state = tmp_path_factory.mktemp("hosts")
    env = clean_env({"MH_STATE": str(state)})
    up = subprocess.run(["bash", str(HOSTS_SH), "up", "2"], capture_output=True, text=True, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        yield env
    finally:
        subprocess.run(["bash", str(HOSTS_SH), "down"], env=env, timeout=120)


def on_host(hosts_env, host: str, command: list[str], timeout: int = 240, **kwargs):
    """``command`` started inside ``host`` (the root namespace has no route to the test subnet)."""
    return subprocess.run(["bash", str(HOSTS_SH), "run", host, *command], capture_output=True, text=True,
                          env=hosts_env, timeout=timeout, **kwargs)


def mpirun_across(*args: str) -> list[str]:
    exports = [flag for name in ROOT_VARIABLES for flag in ("-x", name)]
    return ["mpirun", "-np", "2", "-H", ACROSS, "--bind-to", "none", *exports, sys.executable, *args]


def horovodrun_across(controller: str, *args: str) -> list[str]:
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    return [horovodrun, "-np", "2", "-H", ACROSS, controller, "--network-interface", "mh0", "--disable-cache",
            sys.executable, *args]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


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
    """ssh keepalive (5 s x 3, in the hosts' ssh config) lets mpirun notice the lost host."""
    run_dir = tmp_path / "run"
    args = ["-m", "hvdllm", *train_args(data, run_dir, "--train.steps=100000", "--log.every=100000",
                                        "--checkpoint.every=0")]
    proc = subprocess.Popen(["bash", str(HOSTS_SH), "run", "hostA", "timeout", "-k", "5", "200",
                             *mpirun_across(*args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=hosts)
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
