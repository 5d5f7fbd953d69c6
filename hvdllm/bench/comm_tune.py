"""Horovod's two knobs for small messages, swept: ``HOROVOD_CYCLE_TIME`` (how often its
background thread looks for ready tensors) x ``HOROVOD_FUSION_THRESHOLD`` (how many bytes it
fuses into one allreduce), timed on one 4-byte allreduce and on a model's whole gradient set.

Horovod reads both once at init and cannot be re-initialized in one process (it crashes
here), so each setting is its own ``mpirun`` sub-job on the hosts of the running job
(``python -m hvdllm.bench.comm_tune PRESET REPEATS OUT`` is that sub-job's rank).
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

import torch

from hvdllm.bench.comm_backends import Control
from hvdllm.comm import runtime

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
    """One setting: a rank of its own MPI job, the knobs already in its environment."""
    runtime.init(threads=1)
    hvd = runtime.horovod()
    times = time_loads(hvd, gradient_shapes(preset), repeats)
    gathered = hvd.allgather_object(times, name="tune.times")
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump({k: max(g[k] for g in gathered) for k in times}, f)


def tune_horovod(control: Control, preset: str, repeats: int, say: Callable[[str], None]) -> dict | None:
    """Sweep HOROVOD_CYCLE_TIME x HOROVOD_FUSION_THRESHOLD, one mpirun sub-job per setting on
    the same hosts."""
    from hvdllm.comm.launch import mpi_environment, mpirun_command

    slots = control.host_slots()

    def sweep() -> list[dict]:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for cycle in CYCLE_TIMES_MS:
                for fusion in FUSION_MB:
                    out = Path(tmp) / f"{cycle}-{fusion}.json"
                    env = {"HOROVOD_CYCLE_TIME": str(cycle), "HOROVOD_FUSION_THRESHOLD": str(fusion << 20)}
                    cmd = mpirun_command(control.size, ["-m", "hvdllm.bench.comm_tune", preset,
                                                        str(repeats), str(out)], hosts=slots, export=list(env))
                    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                            env=mpi_environment(dict(os.environ, **env)))
                    if result.returncode != 0:
                        say(f"skip tuning at cycle {cycle} ms / fusion {fusion} MB: "
                            f"{(result.stderr.strip().splitlines() or ['failed'])[-1]}")
                        continue
                    rows.append({"cycle_time_ms": cycle, "fusion_threshold_mb": fusion, **json.loads(out.read_text())})
        return rows

    rows = control.on_rank0_while_others_sleep(sweep)
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


if __name__ == "__main__":
    _tune_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
