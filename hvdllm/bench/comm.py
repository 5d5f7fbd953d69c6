"""``hvdllm bench comm``: collectives of Horovod (MPI, Gloo, NCCL) against raw mpi4py and
torch.distributed, side by side in one job, as nccl-tests and the OSU benchmarks do.

Launch with ``mpirun -np N hvdllm bench comm`` (or ``horovodrun -np N``). In that MPI job
mpi4py, torch.distributed and Horovod-MPI run in-process, one after the other; Horovod with
its Gloo controller cannot share a process with an MPI-initialized Horovod, so rank 0 runs it
as a ``horovodrun --gloo`` sub-job on the same hosts while the MPI ranks sleep. Launched by
``horovodrun --gloo`` itself, only the Gloo backends run.

Each (backend, op, dtype, size) is timed per iteration on every rank; the reported time is
the median over iterations of the maximum across ranks, and every result is checked (on the
first call: allreduce runs in place on every backend, as gradient reduction does, so later
iterations keep summing the same buffer).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hvdllm.bench import comm_report as rep
from hvdllm.errors import UserError

BACKENDS = ("mpi4py", "torch-gloo", "horovod-mpi", "horovod-gloo", "horovod-nccl", "torch-nccl")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CommPlan:
    sizes: list[int]
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    ops: list[str] = field(default_factory=lambda: list(rep.OPS))
    warmup: int = 5
    iters: int = 20

    def iterations(self, nbytes: int) -> int:
        """Fewer iterations for large messages, which are also the least noisy."""
        return self.iters if nbytes < (1 << 20) else max(5, self.iters // 4)


class Control:
    """The control plane: rank, size, gathering timings. mpi4py in an MPI job, else Horovod."""

    def __init__(self, mpi_comm=None, hvd=None) -> None:
        self.mpi, self.hvd = mpi_comm, hvd
        self.rank = mpi_comm.rank if mpi_comm is not None else hvd.rank()
        self.size = mpi_comm.size if mpi_comm is not None else hvd.size()

    def allgather(self, obj):
        if self.mpi is not None:
            return self.mpi.allgather(obj)
        return self.hvd.allgather_object(obj, name="bench_control")

    def barrier(self) -> None:
        if self.mpi is not None:
            self.mpi.Barrier()
        else:
            self.hvd.barrier()

    def agree(self, ok: bool) -> bool:
        return all(self.allgather(bool(ok)))


# --- backends -----------------------------------------------------------------------------
# Each returns, for (op, dtype, count), a function that runs the op once and returns the
# result as a numpy array for checking, or raises NotImplementedError with the reason.

class Mpi4pyBackend:
    name = "mpi4py"

    def __init__(self, comm) -> None:
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm

    def prepare(self, op: str, dtype: str, count: int) -> Callable[[], np.ndarray]:
        if dtype != "fp32":
            raise NotImplementedError("MPI has no standard fp16/bf16 reduction type")
        MPI, comm, n, r = self.MPI, self.comm, self.comm.size, self.comm.rank
        send_count = count // n if op == "allgather" else count
        send = rep.inputs_for(op, r, n, send_count).astype(np.float32)
        if op == "allreduce":  # in place, as a gradient allreduce is; checked on the first call
            buf = send.copy()
            return lambda: (comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), buf)[1]
        if op == "allgather":
            recv = np.empty(send_count * n, dtype=np.float32)
            return lambda: (comm.Allgather(send, recv), recv)[1]
        if op == "broadcast":
            buf = send.copy()
            return lambda: (comm.Bcast(buf, root=0), buf)[1]
        if op == "reducescatter":
            recv = np.empty(count // n, dtype=np.float32)
            return lambda: (comm.Reduce_scatter_block(send, recv, op=MPI.SUM), recv)[1]
        if op == "alltoall":
            recv = np.empty_like(send)
            return lambda: (comm.Alltoall(send, recv), recv)[1]
        if op == "sendrecv":
            recv = np.empty_like(send)
            return lambda: (comm.Sendrecv(send, dest=(r + 1) % n, recvbuf=recv, source=(r - 1) % n), recv)[1]
        raise NotImplementedError(op)


class TorchDistBackend:
    def __init__(self, backend: str, control: Control, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist, self.device, self.name = dist, device, f"torch-{backend}"
        address = None
        if control.rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                address = f"tcp://{socket.gethostname()}:{s.getsockname()[1]}"
        address = control.allgather(address)[0]
        dist.init_process_group(backend, init_method=address, rank=control.rank, world_size=control.size)
        self.n, self.rank = control.size, control.rank

    def close(self) -> None:
        self.dist.destroy_process_group()

    def prepare(self, op: str, dtype: str, count: int) -> Callable[[], np.ndarray]:
        dist, n, r = self.dist, self.n, self.rank
        # torch 2.13 renamed the flat-tensor collectives (*_single); older releases have *_tensor.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        t = lambda a: torch.from_numpy(a).to(self.device, TORCH_DTYPES[dtype])  # noqa: E731
        send_count = count // n if op == "allgather" else count
        send = t(rep.inputs_for(op, r, n, send_count))
        out = lambda x: x.float().cpu().numpy()  # noqa: E731
        if op == "allreduce":  # in place; checked on the first call
            buf = send.clone()
            return lambda: (dist.all_reduce(buf), out(buf))[1]
        if op == "allgather":
            recv = torch.empty(send_count * n, dtype=send.dtype, device=self.device)
            return lambda: (all_gather(recv, send), out(recv))[1]
        if op == "broadcast":
            buf = send.clone()
            return lambda: (dist.broadcast(buf, src=0), out(buf))[1]
        if op == "reducescatter":
            recv = torch.empty(count // n, dtype=send.dtype, device=self.device)
            return lambda: (reduce_scatter(recv, send), out(recv))[1]
        if op == "alltoall":
            recv = torch.empty_like(send)
            return lambda: (dist.all_to_all_single(recv, send), out(recv))[1]
        if op == "sendrecv":
            recv = torch.empty_like(send)

            def exchange():
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (r + 1) % n),
                                               dist.P2POp(dist.irecv, recv, (r - 1) % n)])
                for req in reqs:
                    req.wait()
                return out(recv)

            return exchange
        raise NotImplementedError(op)


class HorovodBackend:
    def __init__(self, name: str, hvd, device: torch.device) -> None:
        self.name, self.hvd, self.device = name, hvd, device
        self.n, self.rank = hvd.size(), hvd.rank()

    def prepare(self, op: str, dtype: str, count: int) -> Callable[[], np.ndarray]:
        hvd, n, r = self.hvd, self.n, self.rank
        if op == "sendrecv":
            raise NotImplementedError("Horovod has no point-to-point operations")
        send_count = count // n if op == "allgather" else count
        send = torch.from_numpy(rep.inputs_for(op, r, n, send_count)).to(self.device, TORCH_DTYPES[dtype])
        out = lambda x: x.float().cpu().numpy()  # noqa: E731
        tag = f"{op}.{dtype}.{count}"
        if op == "allreduce":  # in place, as DistributedOptimizer reduces gradients
            return lambda: out(hvd.allreduce_(send, op=hvd.Sum, name=tag))
        if op == "allgather":
            return lambda: out(hvd.allgather(send, name=tag))
        if op == "broadcast":
            return lambda: out(hvd.broadcast(send, root_rank=0, name=tag))
        if op == "reducescatter":
            return lambda: out(hvd.reducescatter(send, op=hvd.Sum, name=tag))
        if op == "alltoall":
            return lambda: out(hvd.alltoall(send, name=tag))
        raise NotImplementedError(op)


# --- measurement ------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(backend, control: Control, plan: CommPlan, device: torch.device, say: Callable[[str], None]) -> list[dict]:
    """Every op, dtype and size of the plan on one backend; records on rank 0."""
    records = []
    n = control.size
    for op in plan.ops:
        for dtype in plan.dtypes:
            itemsize = torch.finfo(TORCH_DTYPES[dtype]).bits // 8
            for nbytes in plan.sizes:
                # Whole elements, divisible by the ranks where the op cuts the buffer in chunks.
                unit = n if op in ("allgather", "reducescatter", "alltoall") else 1
                count = max(unit, (nbytes // itemsize) // unit * unit)
                try:
                    run = backend.prepare(op, dtype, count)
                    result = run()
                    supported = True
                except (NotImplementedError, RuntimeError, ValueError) as err:
                    supported, reason = False, str(err).strip().splitlines()[0][:120]
                if not control.agree(supported):
                    say(f"skip {backend.name} {op} {dtype}: {reason if not supported else 'unsupported on another rank'}")
                    break
                wrong = rep.count_wrong(result, rep.expected_for(op, control.rank, n, count), dtype)
                for _ in range(plan.warmup):
                    run()
                times = []
                control.barrier()
                for _ in range(plan.iterations(nbytes)):
                    start = time.perf_counter()
                    run()
                    _sync(device)
                    times.append(time.perf_counter() - start)
                gathered = control.allgather((times, wrong))
                if control.rank == 0:
                    slowest = np.max(np.array([t for t, _ in gathered]), axis=0)
                    seconds = float(statistics.median(slowest))
                    real_bytes = count * itemsize
                    algbw, busbw = rep.bandwidths(op, real_bytes, n, seconds)
                    records.append({"backend": backend.name, "op": op, "dtype": dtype, "bytes": real_bytes,
                                    "np": n, "time_s": seconds, "algbw_GBps": algbw, "busbw_GBps": busbw,
                                    "wrong": int(sum(w for _, w in gathered)),
                                    "correct": all(w == 0 for _, w in gathered)})
    return records


def _horovod_on_mpi(comm):
    """Horovod on the MPI job, initialized once: a second init after shutdown crashes."""
    import horovod.torch as hvd

    if not hvd.is_initialized():
        hvd.init(comm=comm)
    return hvd


def _host_slots(control: Control) -> str:
    """``host1:k,host2:m``: where this job's ranks run, for a sub-job on the same hosts."""
    hosts = control.allgather(socket.gethostname())
    return ",".join(f"{h}:{hosts.count(h)}" for h in dict.fromkeys(hosts))


def _on_rank0_while_others_sleep(control: Control, work: Callable[[], object]):
    """Run ``work`` on rank 0 (its result there, None elsewhere); the other MPI ranks wait
    in a polled, sleeping barrier, since a busy MPI barrier would steal the sub-job's cores."""
    result = work() if control.rank == 0 else None
    done = control.mpi.Ibarrier()
    while not done.Test():
        time.sleep(0.05)
    return result


def run_gloo_subjob(control: Control, plan: CommPlan, say: Callable[[str], None], args: list[str]) -> list[dict]:
    """Horovod with its Gloo controller, as a ``horovodrun --gloo`` job on the same hosts."""
    from hvdllm.comm.launch import mpi_environment

    slots = _host_slots(control)

    def work() -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "gloo.json"
            horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
            cmd = [horovodrun, "--gloo", "-np", str(control.size), "-H", slots,
                   sys.executable, "-m", "hvdllm", "bench", "comm", "--backends", "horovod-gloo",
                   "--json", str(out), "--no-plot", *args]
            result = subprocess.run(cmd, capture_output=True, text=True, env=mpi_environment(), timeout=3600)
            if result.returncode == 0 and out.exists():
                return json.loads(out.read_text())["records"]
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            say(f"skip horovod-gloo: horovodrun --gloo failed: {tail[0]}")
            return []

    return _on_rank0_while_others_sleep(control, work) or []


# --- Horovod tuning ---------------------------------------------------------------------

CYCLE_TIMES_MS = (0.1, 0.5, 1.0, 5.0)
FUSION_MB = (0, 4, 32, 128)


def gradient_shapes(preset: str) -> list[torch.Size]:
    from hvdllm.model import GPT, preset_config

    with torch.device("meta"):
        return [p.shape for p in GPT(preset_config(preset)).parameters()]


def time_loads(hvd, shapes: list[torch.Size], repeats: int) -> dict[str, float]:
    """Median seconds of (a) one 4-byte allreduce, (b) every gradient tensor of a model
    allreduced asynchronously and then waited for, as DistributedOptimizer does."""
    small = torch.ones(1)
    grads = [torch.ones(s) for s in shapes]
    latency, full = [], []
    for _ in range(repeats + 2):  # the first two warm up
        start = time.perf_counter()
        hvd.allreduce(small, name="tune.small")
        latency.append(time.perf_counter() - start)
        start = time.perf_counter()
        handles = [hvd.allreduce_async(g, name=f"tune.grad.{j}") for j, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)
        full.append(time.perf_counter() - start)
    return {"small_allreduce_s": statistics.median(latency[2:]), "gradients_s": statistics.median(full[2:])}


def _tune_worker(preset: str, repeats: int, out: str) -> None:
    """One setting, in its own MPI job: Horovod reads the knobs once at init, and shutting it
    down and initializing it again in one process is not reliable (it crashes here)."""
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    times = time_loads(hvd, gradient_shapes(preset), repeats)
    gathered = hvd.allgather_object(times, name="tune.times")
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump({k: max(g[k] for g in gathered) for k in times}, f)


def tune_horovod(control: Control, preset: str, repeats: int, say: Callable[[str], None]) -> dict | None:
    """Sweep HOROVOD_CYCLE_TIME x HOROVOD_FUSION_THRESHOLD, one mpirun sub-job per setting on
    the same hosts."""
    from hvdllm.comm.launch import mpi_environment, mpirun_command

    slots = _host_slots(control)

    def sweep() -> list[dict]:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for cycle in CYCLE_TIMES_MS:
                for fusion in FUSION_MB:
                    out = Path(tmp) / f"{cycle}-{fusion}.json"
                    env = {"HOROVOD_CYCLE_TIME": str(cycle), "HOROVOD_FUSION_THRESHOLD": str(fusion << 20)}
                    cmd = mpirun_command(control.size, ["-m", "hvdllm.bench.comm", "tune-worker", preset,
                                                        str(repeats), str(out)], hosts=slots, export=list(env))
                    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                            env=mpi_environment(dict(os.environ, **env)))
                    if result.returncode != 0:
                        say(f"skip tuning at cycle {cycle} ms / fusion {fusion} MB: "
                            f"{(result.stderr.strip().splitlines() or ['failed'])[-1]}")
                        continue
                    rows.append({"cycle_time_ms": cycle, "fusion_threshold_mb": fusion, **json.loads(out.read_text())})
        return rows

    rows = _on_rank0_while_others_sleep(control, sweep)
    default = next((r for r in rows or [] if r["cycle_time_ms"] == 1.0 and r["fusion_threshold_mb"] == 128), None)
    if default is None:
        return None
    shapes = gradient_shapes(preset)
    best_small = min(rows, key=lambda r: r["small_allreduce_s"])
    best_grads = min(rows, key=lambda r: r["gradients_s"])
    summary = {"preset": preset, "tensors": len(shapes), "gradient_bytes": 4 * sum(s.numel() for s in shapes),
               "rows": rows, "default": default, "best_small": best_small, "best_gradients": best_grads,
               "speedup_small_vs_default": default["small_allreduce_s"] / best_small["small_allreduce_s"],
               "speedup_gradients_vs_default": default["gradients_s"] / best_grads["gradients_s"]}
    say(f"tuning ({preset} gradients, {len(shapes)} tensors): small allreduce best at cycle "
        f"{best_small['cycle_time_ms']} ms / fusion {best_small['fusion_threshold_mb']} MB, "
        f"{summary['speedup_small_vs_default']:.2f}x the default (1 ms / 128 MB); gradients best at "
        f"cycle {best_grads['cycle_time_ms']} ms / fusion {best_grads['fusion_threshold_mb']} MB, "
        f"{summary['speedup_gradients_vs_default']:.2f}x the default")
    return summary


# --- the job ------------------------------------------------------------------------------

def _launched_by_gloo() -> bool:
    return "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ


def _mpi_world_size() -> int:
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS", "MPI_LOCALNRANKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def run_comm_bench(plan: CommPlan, backends: list[str], json_path: str | None, plot_path: str | None,
                   tune: str | None, tune_repeats: int, passthrough: list[str]) -> int:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r} (known: {', '.join(BACKENDS)})")
    wanted = backends or list(BACKENDS)
    gloo_job = _launched_by_gloo()
    if not gloo_job and _mpi_world_size() < 2:
        raise UserError("hvdllm bench comm needs >= 2 ranks: mpirun -np 2 hvdllm bench comm (or horovodrun -np 2)")
    cuda = torch.cuda.is_available()
    records: list[dict] = []
    skipped: list[str] = []
    tuning = None

    if gloo_job:
        import horovod.torch as hvd

        hvd.init()
        control = Control(hvd=hvd)
    else:
        from mpi4py import MPI

        control = Control(mpi_comm=MPI.COMM_WORLD)
    device = torch.device("cuda", int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get(
        "HOROVOD_LOCAL_RANK", "0"))) % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")

    def say(message: str) -> None:
        if control.rank == 0:
            print(message, flush=True)
            if message.startswith("skip "):
                skipped.append(message[5:])

    def skip(backend: str, why: str) -> None:
        if backend in wanted:
            say(f"skip {backend}: {why}")

    for name in wanted:
        if name == "mpi4py":
            if gloo_job:
                skip(name, "launched by horovodrun --gloo: no MPI job")
                continue
            records += measure(Mpi4pyBackend(control.mpi), control, plan, torch.device("cpu"), say)
        elif name in ("torch-gloo", "torch-nccl"):
            if name == "torch-nccl" and not cuda:
                skip(name, "no CUDA device")
                continue
            backend = TorchDistBackend(name.split("-")[1], control, device if name == "torch-nccl" else torch.device("cpu"))
            records += measure(backend, control, plan, backend.device, say)
            backend.close()
        elif name == "horovod-mpi":
            if gloo_job:
                skip(name, "launched by horovodrun --gloo: no MPI job")
                continue
            hvd = _horovod_on_mpi(control.mpi)
            records += measure(HorovodBackend(name, hvd, torch.device("cpu")), control, plan, torch.device("cpu"), say)
        elif name == "horovod-gloo":
            if gloo_job:
                records += measure(HorovodBackend(name, control.hvd, torch.device("cpu")), control, plan,
                                   torch.device("cpu"), say)
            else:
                records += run_gloo_subjob(control, plan, say, passthrough)
        elif name == "horovod-nccl":
            import horovod.torch as hvd_module

            if not cuda or not hvd_module.nccl_built():
                skip(name, "no CUDA device" if not cuda else "this Horovod build has no NCCL operations")
                continue
            hvd = control.hvd if gloo_job else _horovod_on_mpi(control.mpi)
            records += measure(HorovodBackend(name, hvd, device), control, plan, device, say)

    if tune and not gloo_job:
        tuning = tune_horovod(control, tune, tune_repeats, say)
    if control.rank != 0:
        return 0
    result = summarize(records, control.size, skipped, tuning)
    if not gloo_job or json_path:
        print(rep.format_table(records))
        for line in result["summary"]:
            print(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    if plot_path and records:
        print(f"plot: {rep.plot_busbw(records, plot_path)}")
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


if __name__ == "__main__" and sys.argv[1:2] == ["tune-worker"]:
    _tune_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
