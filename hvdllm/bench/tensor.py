"""``hvdllm bench tensor``: how tensor parallelism's collectives should travel, measured.

One ``mpirun -np 2`` job of this module's worker (t = 2). For each ``parallel.tensor_backend``
(a Horovod process set, whose background thread negotiates every collective while the caller
sleeps; the group's mpi4py communicator, which the caller polls; NCCL through
torch.distributed is not measured here without CUDA, and the result says so) it measures, in
the same run:

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
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return tensor


def _backends(groups, hvd) -> dict:
    """The tensor group's all-reduce (in place) over each ``parallel.tensor_backend``."""
    group = groups.group(("tensor",))
    return {"mpi4py": group.allreduce_, "horovod": HorovodReduction(group, hvd).allreduce_}


def _latency(reduce, shape: tuple[int, ...], repeats: int) -> float:
    buffer = torch.randn(shape)
    reduce(buffer, "sum")  # warm-up: buffers and (Horovod) the first negotiation
    start = time.perf_counter()
    for _ in range(repeats):
        reduce(buffer, "sum")
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
    for name, reduce in _backends(groups, hvd).items():
        latency = _latency(reduce, shape, repeats=20)
        small = _latency(reduce, (batch * seq_len,), repeats=50)
        timed = _TimedGroup(hvd.rank(), 2, reduce)
        torch.manual_seed(0)
        model = apply_tensor_parallel(GPT(cfg), timed)
        tokens = torch.randint(cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
        times, shares = [], []
        for step in range(warmup + steps):
            timed.seconds = 0.0
            start = time.perf_counter()
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
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
            "nccl": "not measured: the job runs its tensors on the CPU",
            "horovod_over_mpi4py_latency": horovod["all_reduce_s"] / mpi["all_reduce_s"],
            "horovod_over_mpi4py_token_vector": horovod["token_vector_all_reduce_s"] / mpi["token_vector_all_reduce_s"],
            "horovod_over_mpi4py_step": horovod["step_s"] / mpi["step_s"]}


if __name__ == "__main__":
    preset_, batch_, seq_, steps_, warmup_, out_ = sys.argv[1:7]
    _worker(preset_, int(batch_), int(seq_), int(steps_), int(warmup_), out_)
