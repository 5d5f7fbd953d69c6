"""``hvdllm bench straggler``: ``sync``, ``async`` (parameter server, several staleness
bounds) and ``local-sgd`` side by side, with and without one slowed worker.

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

import json
import subprocess
import tempfile
from pathlib import Path

from hvdllm.comm.launch import mpi_environment, mpirun_command

STRAGGLER = 1  # the slowed worker's rank


def case_settings(case: str) -> tuple[int, list[str]]:
    """(extra server ranks, train overrides) of a case name: sync, async-S, local-sgd-H."""
    if case == "sync":
        return 0, []
    if case.startswith("async-"):
        return 1, ["--parallel.strategy=async", "--parallel.servers=1", f"--parallel.max_staleness={case[6:]}"]
    return 0, ["--parallel.strategy=local-sgd", f"--parallel.local_steps={case[10:]}"]


def tokens_per_step(options, overrides: list[str]) -> int:
    from hvdllm.config import load_config
    from hvdllm.data.shards import read_manifest

    cfg = load_config(options.config, overrides)
    seq_len = cfg.data.seq_len or read_manifest(cfg.data.path)["seq_len"]
    samples = cfg.data.global_batch_size or options.workers * cfg.data.batch_size * cfg.parallel.accum_steps
    return samples * seq_len


def run_case(case: str, straggler: bool, options, overrides: list[str], folder: Path) -> list[dict]:
    """One training job; its evaluations as (step, elapsed_s, val_loss)."""
    servers, settings = case_settings(case)
    run_dir = folder / f"{case}{'-straggler' if straggler else ''}"
    slow = [f"--train.slowdown_rank={STRAGGLER}", f"--train.slowdown_factor={options.slowdown_factor}"]
    args = ["-m", "hvdllm", "train", "--config", options.config, *overrides, f"--train.steps={options.steps}",
            f"--train.eval_every={options.eval_every}", f"--train.run_dir={run_dir}", "--train.threads=1",
            "--checkpoint.every=0", "--log.plot=false", "--log.progress=false", "--log.tensorboard=false",
            f"--parallel.data={options.workers}", *settings, *(slow if straggler else [])]
    done = subprocess.run(mpirun_command(options.workers + servers, args), capture_output=True, text=True,
                          env=mpi_environment(), timeout=options.timeout)
    if done.returncode != 0:  # the CLI prints only the first line of an error: make it the job's own
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")] or done.stderr.splitlines()
        raise RuntimeError(f"straggler bench case {run_dir.name} failed: {errors[-1] if errors else done.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [{"step": r["step"], "elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"]}
            for r in records if r.get("val_loss") is not None]


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["val_loss"] <= target), None)


def default_target(sync_curve: list[dict], steps: int) -> float:
    """What ``sync`` without the straggler reaches three quarters into its run: a loss the
    other runs can reach too (their last evaluations differ from sync's in the last digits,
    even where the arithmetic is the same), with room left to reach it sooner."""
    return next(p for p in sync_curve if p["step"] >= 0.75 * steps)["val_loss"]


def bench_straggler(options, overrides: list[str]) -> dict:
    per_step = tokens_per_step(options, overrides)
    with tempfile.TemporaryDirectory(prefix="hvdllm-straggler-") as tmp:
        curves = {(case, straggler): run_case(case, straggler, options, overrides, Path(tmp))
                  for straggler in (False, True) for case in options.cases}
    target = options.target_loss or default_target(curves[("sync", False)], options.steps)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hvdllm.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for entry in result["cases"]:
        color = colors.setdefault(entry["case"], f"C{len(colors)}")
        ax.plot([p["elapsed_s"] for p in entry["curve"]], [p["val_loss"] for p in entry["curve"]], color=color,
                linestyle="-" if entry["straggler"] else "--", marker="o", markersize=3,
                label=f"{entry['case']}{' (straggler)' if entry['straggler'] else ''}")
    ax.axhline(result["target_val_loss"], color="k", linewidth=0.8, linestyle=":", label="target")
    ax.set_xlabel("wall time since the loop began (s)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{result['workers']} workers, worker {STRAGGLER} slowed x{result['slowdown_factor']:g}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
