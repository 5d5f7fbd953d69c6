"""``hvdllm doctor``: is this environment able to train? Each problem comes with its fix."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field

_MPI_LIBRARY = re.compile(r"\S*/lib(?:mpi|mpich)\.so[\.\d]*$")
_REINSTALL = "run `make install` (it rebuilds Horovod against this torch and MPI)"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)

    def ok(self, what: str, detail: str) -> None:
        print(f"  ok    {what:<12} {detail}", flush=True)

    def fail(self, what: str, detail: str, fix: str) -> None:
        print(f"  FAIL  {what:<12} {detail}\n        fix: {fix}", flush=True)
        self.problems.append(f"{what}: {detail}")


def loaded_mpi_libraries(import_code: str) -> tuple[set[str], str]:
    """The MPI shared libraries a fresh interpreter has mapped after running ``import_code``.

    Run in a subprocess so that neither import disturbs this process, and read from
    /proc/self/maps so that we see what the dynamic loader really picked, not what was asked.
    Returns (real paths, error text).
    """
    probe = (f"{import_code}\n"
             "for line in open('/proc/self/maps'):\n"
             "    parts = line.split()\n"
             "    if len(parts) >= 6: print(parts[5])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return set(), (result.stderr.strip().splitlines() or ["failed"])[-1]
    paths = {os.path.realpath(p) for p in result.stdout.split() if _MPI_LIBRARY.match(p)}
    return paths, ""


def _check_torch(report: Report) -> None:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices = f"CUDA {torch.version.cuda}: {', '.join(names)}"
    else:
        devices = "no CUDA devices (CPU training)"
    report.ok("torch", f"{torch.__version__}, {devices}")


def _check_horovod(report: Report) -> None:
    try:
        import horovod
        import horovod.torch as hvd
    except ImportError as err:
        report.fail("horovod", f"horovod.torch does not import: {err}", _REINSTALL)
        return
    controllers = [name for name, built in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if built]
    ops = [name for name, built in (("NCCL", hvd.nccl_built()), ("MPI", hvd.mpi_built()),
                                    ("Gloo", hvd.gloo_built())) if built]
    detail = (f"{horovod.__version__}, frameworks: PyTorch, controllers: {', '.join(controllers) or 'none'}, "
              f"ops: {', '.join(ops) or 'none'}")
    if "MPI" in controllers and "Gloo" in controllers:
        report.ok("horovod", detail)
    else:
        report.fail("horovod", detail + " (MPI and Gloo controllers are both needed)", _REINSTALL)
    import torch

    if torch.cuda.is_available() and not hvd.nccl_built():
        report.fail("horovod", "torch sees CUDA but Horovod has no NCCL operations", _REINSTALL)


def _check_mpi(report: Report) -> None:
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # only ask for the library version; no MPI_Init here
        from mpi4py import MPI
    except ImportError as err:
        report.fail("mpi4py", f"does not import: {err}", "pip install mpi4py (built against the cluster's MPI)")
        return
    library = MPI.Get_library_version().strip().splitlines()[0]
    report.ok("mpi4py", f"{mpi4py.__version__}, {library}")

    ours, err_ours = loaded_mpi_libraries("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI")
    theirs, err_theirs = loaded_mpi_libraries("import horovod.torch")
    if err_ours or err_theirs:
        report.fail("MPI library", f"could not inspect: {err_ours or err_theirs}", _REINSTALL)
    elif not theirs:
        report.fail("MPI library", "Horovod loads no MPI library", _REINSTALL)
    elif ours != theirs:
        report.fail("MPI library",
                    f"mpi4py loads {', '.join(sorted(ours)) or 'none'} but Horovod loads {', '.join(sorted(theirs))}",
                    "use one MPI: `pip install --no-binary mpi4py --force-reinstall mpi4py` against the MPI "
                    "Horovod was built with, or rebuild Horovod with `make install`")
    else:
        report.ok("MPI library", f"mpi4py and Horovod share {', '.join(sorted(ours))}")


def _check_data_libraries(report: Report) -> None:
    for name, fix in (("h5py", "pip install h5py"), ("tokenizers", "pip install tokenizers")):
        try:
            module = __import__(name)
        except ImportError as err:
            report.fail(name, f"does not import: {err}", fix)
            continue
        detail = module.__version__
        if name == "h5py":
            detail += f", HDF5 {module.version.hdf5_version}"
        report.ok(name, detail)


def _check_ranks(report: Report, ranks: int) -> None:
    from hvdllm.comm.launch import mpi_environment, mpirun_command

    try:
        cmd = mpirun_command(ranks, ["-m", "hvdllm.comm.selftest"])
    except FileNotFoundError as err:
        report.fail("allreduce", str(err), "make install")
        return
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=mpi_environment())
    except subprocess.TimeoutExpired:
        report.fail("allreduce", f"{ranks}-rank allreduce did not finish in 120 s",
                    "check that mpirun works: mpirun -np 2 hostname")
        return
    lines = (result.stdout + result.stderr).strip().splitlines()
    if result.returncode == 0:
        report.ok("allreduce", lines[-1] if lines else "ok")
    else:
        last = lines[-1] if lines else f"exit code {result.returncode} and no output"
        report.fail("allreduce", f"{ranks}-rank Horovod allreduce failed: {last}",
                    "run `mpirun -np 2 python -m hvdllm.comm.selftest` to see the whole error")


def run_doctor(ranks: int = 0) -> int:
    """Print what this environment has; return 0 only when all of it is sound."""
    report = Report()
    print("hvdllm doctor", flush=True)
    report.ok("python", f"{platform.python_version()} ({sys.executable})")
    _check_torch(report)
    _check_horovod(report)
    _check_mpi(report)
    _check_data_libraries(report)
    if ranks:
        _check_ranks(report, ranks)
    if report.problems:
        print(f"doctor: {len(report.problems)} problem(s): " + "; ".join(report.problems), flush=True)
        return 1
    print("doctor: all sound", flush=True)
    return 0
