"""``hvdllm bench pipeline``: the measured bubble of GPipe and 1F1B next to the formula
``(p - 1) / (m + p - 1)``, and each schedule's peak activation memory per stage.

Each (stages p, micro-batches m, schedule) runs as its own ``mpirun -np p`` job of this
module's worker: every rank builds the same model, cut into p stages balanced by FLOPs (the
formula assumes equal stages), and runs steps of the real pipeline executor
(``hvdllm.parallel.pipeline``) on random tokens.

- Bubble: per stage, the time blocked waiting for a neighbour (the transport's receives and
  send completions) over the time of the step's forward and backward passes, averaged over
  the stages and the timed steps. Warm-up steps are not timed.
- Peak activation memory: the bytes of tensors autograd keeps for backward, counted live
  through ``torch.autograd.graph.saved_tensors_hooks`` (each released when its graph is),
  at their peak within a step.

Ranks beyond the machine's cores are oversubscribed: then stages share cores and the
measured bubble says as much about the machine as about the schedule.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from hvdllm.comm.launch import mpi_environment, mpirun_command


def bubble_formula(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@contextmanager
def saved_activation_meter():
    """Yields a dict whose "peak" is the most bytes autograd held for backward at once."""
    meter = {"live": 0, "peak": 0}

    def release(nbytes: int) -> None:
        meter["live"] -= nbytes

    def pack(tensor: torch.Tensor) -> _Saved:
        nbytes = tensor.numel() * tensor.element_size()
        meter["live"] += nbytes
        meter["peak"] = max(meter["peak"], meter["live"])
        saved = _Saved(tensor)
        weakref.finalize(saved, release, nbytes)  # when autograd frees the saved tensor
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        yield meter


def _worker(stages: int, micro_batches: int, schedule: str, preset: str, batch_size: int, seq_len: int,
            steps: int, warmup: int, out: str) -> None:
    from hvdllm.config import load_config
    from hvdllm.data.loader import Batch
    from hvdllm.model import GPT, gpt_config_from
    from hvdllm.optim import build_optimizer
    from hvdllm.parallel import Precision, build_strategy

    cfg = load_config(None, [f"--model.preset={preset}", f"--parallel.pipeline={stages}",
                             f"--parallel.micro_batches={micro_batches}", f"--parallel.schedule={schedule}",
                             "--parallel.balance=flops", f"--data.batch_size={batch_size}", f"--data.seq_len={seq_len}"])
    strategy = build_strategy(cfg, stages)
    strategy.setup(threads=1)
    torch.manual_seed(0)
    model = strategy.parallelize(GPT(gpt_config_from(cfg.model)), torch.device("cpu"))
    optimizer = strategy.wrap_optimizer(build_optimizer(model, cfg.optim), model)
    precision = Precision("fp32", torch.device("cpu"))
    vocab = model.cfg.vocab_size
    batch = Batch(torch.randint(vocab, (batch_size, seq_len)), torch.randint(vocab, (batch_size, seq_len)))
    bubbles, peaks = [], []
    for step in range(warmup + steps):
        strategy.transport.waiting_s = 0.0
        with saved_activation_meter() as meter:
            start = time.perf_counter()
            strategy.forward_backward(model, [batch], precision)
            elapsed, waiting = time.perf_counter() - start, strategy.transport.waiting_s
        strategy.finish_gradients(optimizer, torch.zeros(3, dtype=torch.float64))  # outside the timed part
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            bubbles.append(waiting / elapsed)
            peaks.append(meter["peak"])
    mine = {"stage": strategy.coords.stage, "bubble": statistics.median(bubbles), "peak_bytes": max(peaks)}
    gathered = strategy.allgather_object(mine, name="bench_pipeline")
    if strategy.coords.rank == 0:
        Path(out).write_text(json.dumps(sorted(gathered, key=lambda g: g["stage"])))


def _run_case(stages: int, micro_batches: int, schedule: str, options) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        argv = ["-m", "hvdllm.bench.pipeline", str(stages), str(micro_batches), schedule, options.preset,
                str(options.batch_size), str(options.seq_len), str(options.steps), str(options.warmup), str(out)]
        done = subprocess.run(mpirun_command(stages, argv), capture_output=True, text=True, env=mpi_environment(),
                              timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"pipeline bench p={stages} m={micro_batches} {schedule} failed:\n{done.stderr[-2000:]}")
        per_stage = json.loads(out.read_text())
    measured = statistics.mean(s["bubble"] for s in per_stage)
    formula = bubble_formula(stages, micro_batches)
    return {"stages": stages, "micro_batches": micro_batches, "schedule": schedule, "bubble_measured": measured,
            "bubble_formula": formula, "measured_over_formula": measured / formula if formula else None,
            "bubble_per_stage": [s["bubble"] for s in per_stage],
            "peak_activation_bytes_per_stage": [s["peak_bytes"] for s in per_stage]}


def bench_pipeline(options) -> dict:
    """Every (stages, micro-batches, schedule) of ``options``; result with the targets' checks."""
    cases = [_run_case(p, m, schedule, options) for p in options.stage_counts for m in options.micro_batch_counts
             for schedule in options.schedules]
    checks = []
    for case in cases:
        if case["schedule"] != "1f1b":
            continue
        gpipe = next(c for c in cases if c["schedule"] == "gpipe" and c["stages"] == case["stages"]
                     and c["micro_batches"] == case["micro_batches"])
        bound = max(gpipe["peak_activation_bytes_per_stage"]) * case["stages"] / case["micro_batches"]
        checks.append({"stages": case["stages"], "micro_batches": case["micro_batches"],
                       "peak_1f1b": max(case["peak_activation_bytes_per_stage"]),
                       "gpipe_times_p_over_m": bound,
                       "within": max(case["peak_activation_bytes_per_stage"]) <= bound})
    return {"benchmark": "pipeline", "preset": options.preset, "batch_size": options.batch_size,
            "seq_len": options.seq_len, "steps": options.steps, "cases": cases, "memory_checks": checks}


def plot_bubbles(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hvdllm.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in sorted({c["stages"] for c in result["cases"]}):
        ms = sorted({c["micro_batches"] for c in result["cases"] if c["stages"] == p})
        ax.plot(ms, [bubble_formula(p, m) for m in ms], "k--", linewidth=1, label=f"(p-1)/(m+p-1), p={p}")
        for schedule, marker in (("gpipe", "o"), ("1f1b", "s")):
            points = [c for c in result["cases"] if c["stages"] == p and c["schedule"] == schedule]
            if points:
                ax.plot([c["micro_batches"] for c in points], [c["bubble_measured"] for c in points],
                        marker=marker, label=f"{schedule}, p={p}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble (idle / step time)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    stages_, micro_, schedule_, preset_, batch_, seq_, steps_, warmup_, out_ = sys.argv[1:10]
    _worker(int(stages_), int(micro_), schedule_, preset_, int(batch_), int(seq_), int(steps_), int(warmup_), out_)
