"""``hvdllm bench tensor``: how tensor parallelism's collectives should travel, measured.

One ``mpirun -np 2`` job of this module's worker (t = 2). For each ``parallel.tensor_backend``
(a Horovod process set, whose background thread negotiates every collective while the caller
sleeps; the group's mpi4py communicator, which the caller polls) and for torch.distributed
over the same ranks (NCCL on the GPUs where CUDA is, Gloo on the CPU elsewhere: the library
Megatron-LM's tensor groups use, as a yardstick) it measures, in the same run:

- the latency of one all-reduce of a block's activations (B, T, C) and of one block's four
  (two forward, two backward), and of the cross entropy's per-token vectors (B T,), where only
  latency counts;
- the time of a training step (forward and backward) of the model split over the two ranks
  with that backend carrying every collective, and the share of it spent in them.
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

import torch

from hvdllm.comm.groups import HorovodReduction
from hvdllm.bench.comm_backends import free_tcp_address
from hvdllm.comm.launch import mpi_environment, mpirun_command

BLOCK_ALL_REDUCES = 4  # per block and micro-batch: g after attention and MLP forward, f for both backward


class _TimedGroup:
    """A tensor group whose all-reduces go through ``reduce`` and are timed."""

    def __init__(self, rank: int, size: int, reduce) -> None:
        self.rank, self.size, self._reduce = rank, size, reduce
        self.seconds, self.calls = 0.0, 0

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        start = time.perf_counter()
        self._reduce(tensor, op)
        _finish(tensor.device)  # NCCL only queues the all-reduce
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return tensor


def _backends(groups, hvd) -> dict:
    """The tensor group's all-reduce (in place) over each ``parallel.tensor_backend``, and
    torch.distributed's: name -> (all-reduce, the device its tensors live on)."""
    group = groups.group(("tensor",))
    cpu = torch.device("cpu")
    return {"mpi4py": (group.allreduce_, cpu), "horovod": (HorovodReduction(group, hvd).allreduce_, cpu),
            **_torch_distributed(hvd)}


def _torch_distributed(hvd) -> dict:
    import torch.distributed as dist

    nccl = torch.cuda.is_available() and dist.is_nccl_available()
    device = torch.device("cuda", hvd.local_rank()) if nccl else torch.device("cpu")
    address = hvd.broadcast_object(free_tcp_address() if hvd.rank() == 0 else None, root_rank=0, name="tcp")
    dist.init_process_group("nccl" if nccl else "gloo", init_method=address, rank=hvd.rank(), world_size=hvd.size(),
                            device_id=device if nccl else None)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=ops[op])
        return tensor

    return {"torch-nccl" if nccl else "torch-gloo": (all_reduce, device)}


def _finish(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stopped next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latency(reduce, shape: tuple[int, ...], repeats: int, device: torch.device) -> float:
    buffer = torch.randn(shape, device=device)
    reduce(buffer, "sum")  # warm-up: buffers and (Horovod) the first negotiation
    _finish(device)
    start = time.perf_counter()
    for _ in range(repeats):
        reduce(buffer, "sum")
    _finish(device)
    return (time.perf_counter() - start) / repeats


def _worker(preset: str, batch: int, seq_len: int, steps: int, warmup: int, out: str) -> None:
    from hvdllm import comm
    from hvdllm.config import ParallelConfig
    from hvdllm.model import GPT, preset_config
    from hvdllm.parallel import horovod_environment
    from hvdllm.parallel.tensor import apply_tensor_parallel

    # MPI and Horovod started as a training job starts them (Open MPI yields the core when idle).
    os.environ.update(horovod_environment(ParallelConfig()))
    groups = comm.init({("tensor",): [[0, 1]]}, threads=1, mpi=True)
    hvd = comm.horovod()
    cfg = preset_config(preset)
    shape = (batch, seq_len, cfg.d_model)
    result = {}
    for name, (reduce, device) in _backends(groups, hvd).items():
        latency = _latency(reduce, shape, repeats=20, device=device)
        small = _latency(reduce, (batch * seq_len,), repeats=50, device=device)
        timed = _TimedGroup(hvd.rank(), 2, reduce)
        torch.manual_seed(0)
        model = apply_tensor_parallel(GPT(cfg), timed).to(device)
        tokens = torch.randint(cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
        tokens = tokens.to(device)
        times, shares = [], []
        for step in range(warmup + steps):
            timed.seconds = 0.0
            start = time.perf_counter()
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            _finish(device)
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if step >= warmup:
                times.append(elapsed)
                shares.append(timed.seconds / elapsed)
        result[name] = {"all_reduce_s": latency, "block_all_reduces_s": BLOCK_ALL_REDUCES * latency,
                        "token_vector_all_reduce_s": small,
                        "step_s": statistics.median(times), "collective_share": statistics.median(shares),
                        "all_reduces_per_step": timed.calls // (warmup + steps)}
    if hvd.rank() == 0:
        Path(out).write_text(json.dumps(result))


def bench_tensor(options) -> dict:
    """Both backends on 2 ranks in one job; the result with their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tensor.json"
        argv = ["-m", "hvdllm.bench.tensor", options.preset, str(options.batch_size), str(options.seq_len),
                str(options.steps), str(options.warmup), str(out)]
        done = subprocess.run(mpirun_command(2, argv), capture_output=True, text=True, env=mpi_environment(),
                              timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"tensor bench failed:\n{done.stderr[-2000:]}")
        backends = json.loads(out.read_text())
    mpi, horovod = backends["mpi4py"], backends["horovod"]
    return {"benchmark": "tensor", "tensor": 2, "preset": options.preset, "batch_size": options.batch_size,
            "seq_len": options.seq_len, "steps": options.steps, "backends": backends,
            "nccl": "measured" if "torch-nccl" in backends else "not measured: no CUDA here (Gloo instead)",
            "horovod_over_mpi4py_latency": horovod["all_reduce_s"] / mpi["all_reduce_s"],
            "horovod_over_mpi4py_token_vector": horovod["token_vector_all_reduce_s"] / mpi["token_vector_all_reduce_s"],
            "horovod_over_mpi4py_step": horovod["step_s"] / mpi["step_s"]}


if __name__ == "__main__":
    preset_, batch_, seq_, steps_, warmup_, out_ = sys.argv[1:7]
    _worker(preset_, int(batch_), int(seq_), int(steps_), int(warmup_), out_)
