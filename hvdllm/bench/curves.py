"""Validation-loss curves of ``hvdllm train`` sub-jobs, for the benchmarks that race runs to
a loss (straggler, grow): run one job, read its evaluations, find where it reached a loss."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hvdllm.atomic import atomic_path
from hvdllm.comm.launch import job_error_line


def run_for_curve(command: list[str], run_dir: Path, timeout: int, env: dict[str, str] | None = None) -> list[dict]:
    """Run a training job (``--train.run_dir=run_dir`` among its flags) and return its
    evaluations as (step, elapsed_s, val_loss); elapsed_s counts from its loop's start, so
    start-up costs are left out. A failed job raises with its own error line."""
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:  # the CLI prints only the first line of an error: make it the job's own
        raise RuntimeError(f"benchmark run {run_dir.name} failed (exit status {done.returncode}): "
                           f"{job_error_line(done.stderr)}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [{"step": r["step"], "elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"]}
            for r in records if r.get("val_loss") is not None]


# Layouts with the same arithmetic differ in a loss by the order of their float sums (up to
# 2e-6 relative after 45 steps of gpt-mini here): a run that reaches the target's own value
# that closely has reached it.
SAME_LOSS_RTOL = 1e-5


def first_reaching(curve: list[dict], target: float) -> dict | None:
    limit = target * (1 + SAME_LOSS_RTOL)
    return next((point for point in curve if point["val_loss"] <= limit), None)


def loss_at_fraction(curve: list[dict], steps: int, fraction: float = 0.75) -> float:
    """The validation loss a run reached ``fraction`` into its ``steps``: a target the other
    runs can reach too (their last evaluations differ in the last digits even where the
    arithmetic is the same), with room left to reach it sooner."""
    return next(p for p in curve if p["step"] >= fraction * steps)["val_loss"]


def tokens_per_step(config: str, overrides: list[str], ranks: int) -> int:
    """Tokens in one optimizer step of the config's run on ``ranks`` data-parallel ranks."""
    from hvdllm.config import load_config
    from hvdllm.data.shards import read_manifest

    cfg = load_config(config, overrides)
    seq_len = cfg.data.seq_len or read_manifest(cfg.data.path)["seq_len"]
    samples = cfg.data.global_batch_size or ranks * cfg.data.batch_size * cfg.parallel.accum_steps
    return samples * seq_len


def plot_loss_curves(lines: list[dict], target: float, title: str, path: str | Path) -> Path:
    """Validation loss against wall time, one line per ``{"label", "curve", "linestyle",
    "color" (optional), "offset_s" (optional: seconds added to its times)}``, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line in lines:
        ax.plot([line.get("offset_s", 0.0) + p["elapsed_s"] for p in line["curve"]],
                [p["val_loss"] for p in line["curve"]], color=line.get("color"), linestyle=line["linestyle"],
                marker="o", markersize=3, label=line["label"])
    ax.axhline(target, color="k", linewidth=0.8, linestyle=":", label="target")
    ax.set_xlabel("wall time since the loop began (s)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
