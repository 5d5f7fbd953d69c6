"""``hvdllm bench straggler``: ``sync``, ``async`` (parameter server, several staleness
bounds, and s = 0 with ``parallel.load_balance``) and ``local-sgd`` side by side, with and
without one slowed worker.

Every case is its own ``mpirun`` job of ``hvdllm train`` on the same config, data, model and
per-worker batch (``async`` adds one server rank), so the global batch per step is the same;
with the straggler, worker 1 sleeps ``factor - 1`` times its own compute time every step
(``train.slowdown_rank`` / ``train.slowdown_factor``). From each run's metrics.jsonl: the
validation loss against wall time (seconds since the run's loop began, so start-up costs
are left out) and against tokens. Reported per case: the wall time and the tokens to first
reach a fixed validation loss (``--target-loss``; by default what ``sync`` without the
straggler reaches three quarters into its run), and their ratios to ``sync`` in the same
condition.

Targets (issue 12): with the straggler, ``async`` or ``local-sgd`` reaches the loss in at most
0.8 of ``sync``'s wall time; without it, needing at most 1.1x ``sync``'s tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hvdllm.bench.curves import first_reaching, loss_at_fraction, plot_loss_curves, run_for_curve, tokens_per_step
from hvdllm.comm.launch import mpi_environment, mpirun_command

STRAGGLER = 1  # the slowed worker's rank


def case_settings(case: str) -> tuple[int, list[str]]:
    """(extra server ranks, train overrides) of a case name: sync, async-S, async-lb, local-sgd-H."""
    if case == "sync":
        return 0, []
    if case == "async-lb":  # s = 0 with the global batch split by the workers' speeds
        return 1, ["--parallel.strategy=async", "--parallel.servers=1", "--parallel.load_balance=true"]
    if case.startswith("async-"):
        return 1, ["--parallel.strategy=async", "--parallel.servers=1", f"--parallel.max_staleness={case[6:]}"]
    return 0, ["--parallel.strategy=local-sgd", f"--parallel.local_steps={case[10:]}"]


def run_case(case: str, straggler: bool, options, overrides: list[str], folder: Path) -> list[dict]:
    """One training job; its evaluations as (step, elapsed_s, val_loss)."""
    servers, settings = case_settings(case)
    run_dir = folder / f"{case}{'-straggler' if straggler else ''}"
    slow = [f"--train.slowdown_rank={STRAGGLER}", f"--train.slowdown_factor={options.slowdown_factor}"]
    args = ["-m", "hvdllm", "train", "--config", options.config, *overrides, f"--train.steps={options.steps}",
            f"--train.eval_every={options.eval_every}", f"--train.run_dir={run_dir}", "--train.threads=1",
            "--checkpoint.every=0", "--log.plot=false", "--log.progress=false", "--log.tensorboard=false",
            f"--parallel.data={options.workers}", *settings, *(slow if straggler else [])]
    return run_for_curve(mpirun_command(options.workers + servers, args), run_dir, options.timeout, mpi_environment())


def bench_straggler(options, overrides: list[str]) -> dict:
    per_step = tokens_per_step(options.config, overrides, options.workers)
    with tempfile.TemporaryDirectory(prefix="hvdllm-straggler-") as tmp:
        curves = {(case, straggler): run_case(case, straggler, options, overrides, Path(tmp))
                  for straggler in (False, True) for case in options.cases}
    # By default: what sync without the straggler reaches three quarters into its run.
    target = options.target_loss or loss_at_fraction(curves[("sync", False)], options.steps)
    cases = []
    for (case, straggler), curve in curves.items():
        hit = first_reaching(curve, target)
        cases.append({"case": case, "straggler": straggler, "curve": curve, "final_val_loss": curve[-1]["val_loss"],
                      "time_to_target_s": hit["elapsed_s"] if hit else None,
                      "tokens_to_target": hit["step"] * per_step if hit else None})
    for entry in cases:
        sync = next(c for c in cases if c["case"] == "sync" and c["straggler"] == entry["straggler"])
        for key, ratio in (("time_to_target_s", "time_ratio_to_sync"), ("tokens_to_target", "tokens_ratio_to_sync")):
            entry[ratio] = entry[key] / sync[key] if entry[key] is not None and sync[key] else None
    others = [c for c in cases if c["case"] != "sync"]
    met_time = [c["case"] for c in others if c["straggler"] and c["time_ratio_to_sync"] is not None
                and c["time_ratio_to_sync"] <= 0.8]
    met_tokens = [c["case"] for c in others if not c["straggler"] and c["tokens_ratio_to_sync"] is not None
                  and c["tokens_ratio_to_sync"] <= 1.1]
    return {"benchmark": "straggler", "config": options.config, "overrides": overrides, "workers": options.workers,
            "steps": options.steps, "slowdown_factor": options.slowdown_factor, "tokens_per_step": per_step,
            "target_val_loss": target, "cases": cases,
            "targets": {"time_ratio_with_straggler_at_most_0.8": met_time,
                        "tokens_ratio_without_straggler_at_most_1.1": met_tokens,
                        "met_by": sorted(set(met_time) & set(met_tokens))}}


def plot_straggler(result: dict, path: str | Path) -> Path:
    """Validation loss against wall time, one line per case; dashed: without the straggler."""
    colors: dict[str, str] = {}
    lines = [{"label": f"{entry['case']}{' (straggler)' if entry['straggler'] else ''}", "curve": entry["curve"],
              "color": colors.setdefault(entry["case"], f"C{len(colors)}"),
              "linestyle": "-" if entry["straggler"] else "--"} for entry in result["cases"]]
    title = f"{result['workers']} workers, worker {STRAGGLER} slowed x{result['slowdown_factor']:g}"
    return plot_loss_curves(lines, result["target_val_loss"], title, path)
