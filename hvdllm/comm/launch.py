"""Build ``mpirun`` command lines that work here and on a cluster.

Open MPI refuses to run as root without two variables, and on a machine with fewer cores
than ranks it needs ``--oversubscribe``; both are added only where they apply.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Sequence


# Variables through which Open MPI / PMIx tell a process which job it belongs to. A process
# that initialized MPI as a singleton passes them on to its children; a new mpirun that
# inherits them tries to join that job instead of starting its own, and fails.
_JOB_CONTEXT_PREFIXES = ("PMIX_", "OMPI_COMM_WORLD_", "OMPI_MCA_orte_", "OMPI_MCA_ess", "OMPI_MCA_pmix",
                         "OMPI_MCA_initial_wdir", "OMPI_UNIVERSE_SIZE", "OMPI_FIRST_RANKS", "OMPI_APP_CTX_",
                         "OMPI_NUM_APP_CTX", "OMPI_FILE_LOCATION", "OMPI_MCA_shmem_RUNTIME_QUERY_hint")


# What launchers tell each process about the size of its job.
_WORLD_SIZE_VARIABLES = (
    "OMPI_COMM_WORLD_SIZE",  # Open MPI's mpirun, and horovodrun over it
    "HOROVOD_SIZE",  # horovodrun --gloo
    "PMI_SIZE",  # MPICH and Intel MPI (hydra), srun --mpi=pmi2
    "MV2_COMM_WORLD_SIZE",  # MVAPICH2
    "SLURM_STEP_NUM_TASKS",  # srun
)


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """The number of processes the launcher started for this job, read before any
    communication runtime is initialized; 1 for a plain ``python``/``hvdllm`` command."""
    env = os.environ if environ is None else environ
    for name in _WORLD_SIZE_VARIABLES:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def launched_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank in its job as the launcher says, read before any communication
    runtime is initialized; 0 for a plain ``python``/``hvdllm`` command."""
    env = os.environ if environ is None else environ
    for name in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def mpi_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for launching a new MPI job: the caller's, less any inherited MPI job
    context, plus what Open MPI needs to run as root."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(_JOB_CONTEXT_PREFIXES)}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def mpirun_command(np: int, argv: Sequence[str], hosts: str = "", export: Sequence[str] = ()) -> list[str]:
    """``mpirun -np N [-H hosts] [-x VAR ...] python argv...`` with the flags a small shared
    machine needs. ``export`` names variables to pass to ranks on other hosts too."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found: run `make install` or `module load openmpi`")
    cmd = [mpirun, "-np", str(np), "--bind-to", "none"]
    if hosts:
        cmd += ["-H", hosts]
    elif (os.cpu_count() or 1) < np:
        cmd.append("--oversubscribe")
    for name in export:
        cmd += ["-x", name]
    return cmd + [sys.executable, *argv]


def job_error_line(output: str) -> str:
    """What a failed hvdllm job said went wrong: its last ``error:`` line (the CLI's one line
    per rank), else its last line of output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "no output")
