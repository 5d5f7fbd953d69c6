"""``hvdllm bench comm``: collectives of Horovod (MPI, Gloo, NCCL) against raw mpi4py and
torch.distributed, side by side in one job, as nccl-tests and the OSU benchmarks do.

Launch with ``mpirun -np N hvdllm bench comm`` (or ``horovodrun -np N``). In that MPI job
mpi4py, torch.distributed and Horovod-MPI run in-process, one after the other; Horovod with
its Gloo controller cannot share a process with an MPI-initialized Horovod, so rank 0 runs it
as a ``horovodrun --gloo`` sub-job on the same hosts while the MPI ranks sleep. Launched by
``horovodrun --gloo`` itself, only the Gloo backends run.

Each (backend, op, dtype, size) is timed per iteration on every rank; the reported time is
the median over iterations of the maximum across ranks. Every result is checked on every
rank: the first call's and each timed call's, outside the timed region (``checked`` counts
them). Allreduce runs in place on every backend, as gradient reduction does; its buffer is
put back to the input before each call (not timed), so every call sums the same small
integers, exact and finite in fp16 and bf16.

The libraries under test and the control plane are in ``comm_backends``, the Horovod
cycle-time x fusion sweep (``--tune-preset``) in ``comm_tune``, the arithmetic in ``comm_report``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hvdllm.atomic import write_text_atomic
from hvdllm.bench import comm_report as rep
from hvdllm.bench.comm_backends import TORCH_DTYPES, Control, HorovodBackend, Mpi4pyBackend, TorchDistBackend
from hvdllm.bench.options import COMM_BACKENDS, CommBenchOptions, as_argv
from hvdllm.comm import runtime
from hvdllm.comm.launch import launched_world_size, mpi_environment
from hvdllm.errors import UserError

# The flags that define the sweep, passed on to the horovodrun --gloo sub-job.
SWEEP_FLAGS = ("sizes", "factor", "dtypes", "ops", "warmup", "iters")


# --- measurement ------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_iterations(iters: int, nbytes: int) -> int:
    """Fewer iterations for large messages, which are also the least noisy."""
    return iters if nbytes < (1 << 20) else max(5, iters // 4)


def measure(backend, control: Control, options: CommBenchOptions, device: torch.device,
            say: Callable[[str], None]) -> list[dict]:
    """Every op, dtype and size of the sweep on one backend; records on rank 0."""
    records = []
    n = control.size
    for op in options.ops:
        for dtype in options.dtypes:
            itemsize = torch.finfo(TORCH_DTYPES[dtype]).bits // 8
            for nbytes in options.message_sizes:
                # Whole elements, divisible by the ranks where the op cuts the buffer in chunks.
                unit = n if op in ("allgather", "reducescatter", "alltoall") else 1
                count = max(unit, (nbytes // itemsize) // unit * unit)
                try:
                    case = backend.prepare(op, dtype, count)
                    case.run()
                    supported = True
                except (NotImplementedError, RuntimeError, ValueError) as err:
                    supported, reason = False, str(err).strip().splitlines()[0][:120]
                if not control.agree(supported):
                    say(f"skip {backend.name} {op} {dtype}: {reason if not supported else 'unsupported on another rank'}")
                    break
                expected = rep.expected_for(op, control.rank, n, count)
                wrong = rep.count_wrong(case.result(), expected, dtype)
                for _ in range(options.warmup):
                    case.reset()
                    case.run()
                times = []
                control.barrier()
                for _ in range(_timed_iterations(options.iters, nbytes)):
                    case.reset()  # not timed: the input back in an in-place buffer
                    _sync(device)
                    start = time.perf_counter()
                    case.run()
                    _sync(device)
                    times.append(time.perf_counter() - start)
                    wrong += rep.count_wrong(case.result(), expected, dtype)  # every timed result, not timed
                gathered = control.allgather((times, wrong))
                if control.rank == 0:
                    slowest = np.max(np.array([t for t, _ in gathered]), axis=0)
                    seconds = float(statistics.median(slowest))
                    real_bytes = count * itemsize
                    algbw, busbw = rep.bandwidths(op, real_bytes, n, seconds)
                    records.append({"backend": backend.name, "op": op, "dtype": dtype, "bytes": real_bytes,
                                    "np": n, "time_s": seconds, "algbw_GBps": algbw, "busbw_GBps": busbw,
                                    "checked": 1 + len(times), "wrong": int(sum(w for _, w in gathered)),
                                    "correct": all(w == 0 for _, w in gathered)})
    return records


def _horovod_on_mpi():
    """Horovod on the MPI job's COMM_WORLD, initialized once (by the runtime): a second init
    after shutdown crashes."""
    runtime.init(mpi=True)
    return runtime.horovod()


def run_gloo_subjob(control: Control, options: CommBenchOptions, say: Callable[[str], None]) -> list[dict]:
    """Horovod with its Gloo controller, as a ``horovodrun --gloo`` job on the same hosts."""
    slots = control.host_slots()

    def work() -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "gloo.json"
            horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
            cmd = [horovodrun, "--gloo", "-np", str(control.size), "-H", slots,
                   sys.executable, "-m", "hvdllm", "bench", "comm", "--backends", "horovod-gloo",
                   "--json", str(out), "--no-plot", *as_argv(options, SWEEP_FLAGS)]
            result = subprocess.run(cmd, capture_output=True, text=True, env=mpi_environment(), timeout=3600)
            if result.returncode == 0 and out.exists():
                return json.loads(out.read_text())["records"]
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            say(f"skip horovod-gloo: horovodrun --gloo failed: {tail[0]}")
            return []

    return control.on_rank0_while_others_sleep(work) or []


# --- the job ------------------------------------------------------------------------------

def _launched_by_gloo() -> bool:
    return "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ


def measure_backends(wanted, control: Control, options: CommBenchOptions, device: torch.device, gloo_job: bool,
                     say: Callable[[str], None], skip: Callable[[str, str], None]) -> list[dict]:
    """Collective: the records of every wanted backend this job can run (the others are skipped,
    saying why)."""
    cuda = device.type == "cuda"
    records: list[dict] = []
    for name in wanted:
        if name == "mpi4py":
            if gloo_job:
                skip(name, "launched by horovodrun --gloo: no MPI job")
                continue
            records += measure(Mpi4pyBackend(control.mpi), control, options, torch.device("cpu"), say)
        elif name in ("torch-gloo", "torch-nccl"):
            if name == "torch-nccl" and not cuda:
                skip(name, "no CUDA device")
                continue
            backend = TorchDistBackend(name.split("-")[1], control, device if name == "torch-nccl" else torch.device("cpu"))
            records += measure(backend, control, options, backend.device, say)
            backend.close()
        elif name == "horovod-mpi":
            if gloo_job:
                skip(name, "launched by horovodrun --gloo: no MPI job")
                continue
            hvd = _horovod_on_mpi()
            records += measure(HorovodBackend(name, hvd, torch.device("cpu")), control, options, torch.device("cpu"),
                               say)
        elif name == "horovod-gloo":
            if gloo_job:
                records += measure(HorovodBackend(name, control.hvd, torch.device("cpu")), control, options,
                                   torch.device("cpu"), say)
            else:
                records += run_gloo_subjob(control, options, say)
        elif name == "horovod-nccl":
            import horovod.torch as hvd_module

            if not cuda or not hvd_module.nccl_built():
                skip(name, "no CUDA device" if not cuda else "this Horovod build has no NCCL operations")
                continue
            hvd = control.hvd if gloo_job else _horovod_on_mpi()
            records += measure(HorovodBackend(name, hvd, device), control, options, device, say)
    return records


def run_comm_bench(options: CommBenchOptions) -> int:
    """The whole benchmark on every rank of the job; rank 0 prints, writes and plots."""
    wanted = options.backends or COMM_BACKENDS
    gloo_job = _launched_by_gloo()
    if not gloo_job and launched_world_size() < 2:
        raise UserError("hvdllm bench comm needs >= 2 ranks: mpirun -np 2 hvdllm bench comm (or horovodrun -np 2)")
    cuda = torch.cuda.is_available()
    skipped: list[str] = []
    tuning = None

    if gloo_job:
        runtime.init()
        control = Control(hvd=runtime.horovod())
    else:
        from mpi4py import MPI

        control = Control(mpi_comm=MPI.COMM_WORLD)
    local_rank = control.local_rank()  # a collective: every rank asks, with or without CUDA
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")

    def say(message: str) -> None:
        if control.rank == 0:
            print(message, flush=True)
            if message.startswith("skip "):
                skipped.append(message[5:])

    def skip(backend: str, why: str) -> None:
        if backend in wanted:
            say(f"skip {backend}: {why}")

    records = measure_backends(wanted, control, options, device, gloo_job, say, skip)

    if options.tune_preset and not gloo_job:
        from hvdllm.bench.comm_tune import tune_horovod

        tuning = tune_horovod(control, options.tune_preset, options.tune_repeats, say)
    hosts = control.hosts()  # collective: before the other ranks leave
    if control.rank != 0:
        return 0
    result = {"hosts": hosts, **summarize(records, control.size, skipped, tuning)}
    if not gloo_job or options.json:
        print(rep.format_table(records))
        for line in result["summary"]:
            print(line)
    if options.json:
        write_text_atomic(Path(options.json), json.dumps(result, indent=2) + "\n")
    if options.plot_path and records:
        print(f"plot: {rep.plot_busbw(records, options.plot_path)}")
    return 0 if all(r["correct"] for r in records) else 1


def summarize(records: list[dict], n: int, skipped: list[str], tuning: dict | None) -> dict:
    lines = []
    fits = {}
    for backend in sorted({r["backend"] for r in records}):
        rows = [r for r in records if r["backend"] == backend and r["op"] == "allreduce" and r["dtype"] == "fp32"]
        if len(rows) >= 2:
            fit = rep.fit_ring_model([r["bytes"] for r in rows], [r["time_s"] for r in rows], n)
            fits[backend] = fit
            lines.append(f"ring model {backend}: alpha {fit['alpha_s'] * 1e6:.2f} us, beta {fit['beta_Bps'] / 1e9:.3f} GB/s, "
                         f"rms error {fit['rms_relative_error']:.1%}")
    ratios = {}
    base = {r["bytes"]: r for r in records if r["backend"] == "mpi4py" and r["op"] == "allreduce" and r["dtype"] == "fp32"}
    for backend in ("horovod-mpi", "horovod-gloo"):
        for r in records:
            if (r["backend"] == backend and r["op"] == "allreduce" and r["dtype"] == "fp32"
                    and r["bytes"] >= 16 << 20 and r["bytes"] in base):
                ratios.setdefault(backend, {})[r["bytes"]] = r["busbw_GBps"] / base[r["bytes"]]["busbw_GBps"]
    for backend, by_size in ratios.items():
        lines.append(f"{backend} / mpi4py allreduce busbw at >= 16MB: "
                     + ", ".join(f"{rep.format_size(b)} {v:.2f}x" for b, v in sorted(by_size.items()))
                     + " (target >= 0.9x)")
    wrong = [f"{r['backend']} {r['op']} {r['dtype']} {r['bytes']}B" for r in records if not r["correct"]]
    lines.append(f"correctness: {len(records) - len(wrong)} of {len(records)} results right"
                 + (f"; WRONG: {', '.join(wrong)}" if wrong else ""))
    return {"np": n, "records": records, "skipped": skipped, "ring_fit": fits,
            "busbw_ratio_to_mpi4py": {b: {str(k): v for k, v in d.items()} for b, d in ratios.items()},
            "tuning": tuning, "summary": lines}

