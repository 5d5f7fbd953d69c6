"""``hvdllm report RUN_DIR``: summary of a run from metrics.jsonl, and its plot redrawn."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from hvdllm.atomic import atomic_path
from hvdllm.errors import UserError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics (is {run_dir} a run folder?)")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{line_no}: not a JSON line") from None
    return records


def plot_run(records: list[dict], path: str | Path) -> Path:
    """A PNG with train/val loss against step and throughput against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    speed = [r for r in train if r.get("tokens_per_s")]
    ax_speed.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], color="tab:green")
    ax_speed.set(xlabel="step", ylabel="tokens/s (all ranks)", title="throughput")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")  # the temporary name has no .png to go by
    finally:
        plt.close(fig)
    return Path(path)


def summarize(records: list[dict]) -> str:
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    if not train:
        return "no training steps logged"
    first, last = train[0], train[-1]
    speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    lines = [f"steps        {first['step']} .. {last['step']}",
             f"train loss   {first['loss']:.4f} -> {last['loss']:.4f}"]
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        lines.append(f"val loss     {val[0]['val_loss']:.4f} -> {val[-1]['val_loss']:.4f} "
                     f"(best {best['val_loss']:.4f} at step {best['step']}, perplexity {math.exp(best['val_loss']):.2f}, "
                     f"accuracy {best.get('val_acc', float('nan')):.3f})")
    if speeds:
        lines.append(f"throughput   median {statistics.median(speeds):,.0f} tokens/s over all ranks")
    mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
    if mfu:
        lines.append(f"MFU          median {statistics.median(mfu):.4f}")
    return "\n".join(lines)


def run_report(run_dir: str | Path) -> int:
    records = read_metrics(run_dir)
    print(summarize(records))
    if any(r.get("loss") is not None for r in records):
        print(f"plot         {plot_run(records, Path(run_dir) / 'training.png')}")
    return 0
