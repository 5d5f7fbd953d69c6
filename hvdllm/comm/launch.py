"""Build ``mpirun`` command lines that work here and on a cluster.

Open MPI refuses to run as root without two variables, and on a machine with fewer cores
than ranks it needs ``--oversubscribe``; both are added only where they apply.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Sequence


def mpi_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def mpirun_command(np: int, argv: Sequence[str], python: bool = True) -> list[str]:
    """``mpirun -np N [python] argv...`` with the flags a small shared machine needs."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found: run `make install` or `module load openmpi`")
    cmd = [mpirun, "-np", str(np), "--bind-to", "none"]
    if (os.cpu_count() or 1) < np:
        cmd.append("--oversubscribe")
    return cmd + ([sys.executable] if python else []) + list(argv)
