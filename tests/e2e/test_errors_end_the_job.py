"""An error on one rank of a multi-rank job ends the whole job at once, with one line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.corpus import clean_env, error_lines

from hvdllm.comm.launch import mpirun_command

# `hvdllm doctor` whose work fails on one rank only while the other waits in a collective:
# what any verb does when a rank meets a fault the others cannot know about.
PROBE = """
import sys
from hvdllm import cli
from hvdllm.errors import UserError

def failing_on_one_rank(args, extra):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.rank == 1:
        raise {error}("disk on fire")
    comm.barrier()  # waits for rank 1 for ever, unless the job is ended
    return 0

real_build = cli.build_parser
def build_parser():
    parser, handlers = real_build()
    handlers["doctor"] = failing_on_one_rank
    return parser, handlers
cli.build_parser = build_parser
sys.exit(cli.main(["doctor"]))
"""


def run_probe(launcher: list[str], error: str, env=None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    result = subprocess.run(launcher + ["-c", PROBE.format(error=error)], capture_output=True, text=True,
                            timeout=120, env=clean_env(env))
    return result, time.time() - start


@pytest.mark.parametrize("error, line", [
    ("RuntimeError", "error: RuntimeError: disk on fire (rank 1; set HVDLLM_TRACEBACK=1 for the traceback)"),
    ("UserError", "error: disk on fire"),
])
def test_error_on_one_rank_ends_the_mpirun_job(error, line):
    result, seconds = run_probe(mpirun_command(2, []), error)
    assert result.returncode != 0
    assert error_lines(result) == [line], result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 30


def test_traceback_on_request():
    result, _ = run_probe(mpirun_command(2, []), "RuntimeError", env=dict(os.environ, HVDLLM_TRACEBACK="1"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "\nRuntimeError: disk on fire\n" in result.stderr
    assert error_lines(result) == ["error: RuntimeError: disk on fire (rank 1)"]


GLOO_PROBE = """
import sys, time
from hvdllm import cli

def failing_on_one_rank(args, extra):
    import horovod.torch as hvd
    hvd.init()
    if hvd.rank() == 1:
        raise RuntimeError("disk on fire")
    time.sleep(300)  # a rank busy elsewhere must still be ended
    return 0

real_build = cli.build_parser
def build_parser():
    parser, handlers = real_build()
    handlers["doctor"] = failing_on_one_rank
    return parser, handlers
cli.build_parser = build_parser
sys.exit(cli.main(["doctor"]))
"""


def test_error_on_one_rank_ends_the_horovodrun_gloo_job():
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    start = time.time()
    result = subprocess.run([horovodrun, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, "-c", GLOO_PROBE],
                            capture_output=True, text=True, timeout=120, env=clean_env())
    assert result.returncode != 0
    assert any(line.endswith("error: RuntimeError: disk on fire (rank 1; set HVDLLM_TRACEBACK=1 for the traceback)")
               for line in result.stdout.splitlines() + result.stderr.splitlines()), result.stderr
    assert time.time() - start < 60
