"""What a study found: one row per trial (number, state, parameters, best validation loss,
steps, wall time), printed as a table and written as trials.csv and trials.json, the best
parameters as ``hvdllm train`` overrides, and tune.png. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from hvdllm.atomic import atomic_path, write_json_atomic, write_text_atomic
from hvdllm.tune.space import override
from hvdllm.tune.study import INTERRUPTED

# Per trial, besides Optuna's own state and parameters (set by hvdllm.tune.run).
VAL_CURVE, STEPS, WALL_S, ERROR = "val_losses", "steps", "wall_s", "error"
_STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def trial_rows(trials: list[FrozenTrial], keys: list[str]) -> list[dict[str, Any]]:
    """One row per ended trial, in trial order; ``val_loss`` is the best validation loss the
    trial's job logged (for a pruned trial too), None when it logged none."""
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state not in _STATES:
            continue  # queued or (in another process's view) running
        curve = trial.user_attrs.get(VAL_CURVE, [])
        rows.append({"trial": trial.number,
                     "state": "interrupted" if trial.user_attrs.get(INTERRUPTED) else _STATES[trial.state],
                     **{key: trial.params.get(key) for key in keys},
                     "val_loss": min((loss for _, loss in curve), default=None),
                     "steps": trial.user_attrs.get(STEPS), "wall_s": trial.user_attrs.get(WALL_S),
                     "error": trial.user_attrs.get(ERROR, ""), "curve": curve})
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    complete = [r for r in rows if r["state"] == "complete" and r["val_loss"] is not None]
    return min(complete, key=lambda r: r["val_loss"], default=None)


def best_overrides(row: dict[str, Any], keys: list[str]) -> str:
    return " ".join(override(key, row[key]) for key in keys)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def format_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    columns = ["trial", "state", *keys, "val_loss", "steps", "wall_s"]
    cells = [columns] + [[_cell(round(r[c], 1) if c == "wall_s" and r[c] is not None else r[c]) for c in columns]
                         for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells)


def write_tables(folder: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """trials.csv (the table; the error of a failed trial in its last column) and trials.json
    (the rows with each trial's validation curve, and the best trial)."""
    columns = ["trial", "state", *keys, "val_loss", "steps", "wall_s", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(folder / "trials.csv", text.getvalue())
    best = best_row(rows)
    write_json_atomic(folder / "trials.json", {
        "space": keys, "trials": rows,
        "best": None if best is None else {"trial": best["trial"], "val_loss": best["val_loss"],
                                           "params": {k: best[k] for k in keys},
                                           "overrides": best_overrides(best, keys)}})


def plot_study(rows: list[dict[str, Any]], path: Path) -> Path:
    """Left: validation loss against step for every trial (pruned ones dashed, ending in a
    cross where they were stopped). Right: each trial's best validation loss and the best so
    far against the trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, progress) = plt.subplots(1, 2, figsize=(11, 4.5))
    for row in rows:
        if not row["curve"]:
            continue
        steps, losses = zip(*row["curve"])
        pruned = row["state"] == "pruned"
        line, = curves.plot(steps, losses, linestyle="--" if pruned else "-", marker=".", markersize=4,
                            label=f"{row['trial']} ({row['state']})")
        if pruned:
            curves.plot(steps[-1], losses[-1], marker="x", markersize=9, color=line.get_color())
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss")
    curves.set_title("validation loss per trial (dashed, x: pruned)")
    if len(rows) <= 20:
        curves.legend(fontsize=7, title="trial", title_fontsize=7)
    best_so_far, running = [], math.inf
    for row in rows:
        if row["state"] == "complete" and row["val_loss"] is not None:
            running = min(running, row["val_loss"])
        best_so_far.append(running if math.isfinite(running) else None)
    for state, marker in (("complete", "o"), ("pruned", "x")):
        points = [(r["trial"], r["val_loss"]) for r in rows if r["state"] == state and r["val_loss"] is not None]
        if points:
            progress.scatter(*zip(*points), marker=marker, label=state)
    known = [(r["trial"], best) for r, best in zip(rows, best_so_far) if best is not None]
    if known:
        progress.step(*zip(*known), where="post", color="k", label="best so far (complete)")
    progress.xaxis.set_major_locator(MaxNLocator(integer=True))
    progress.set_xlabel("trial")
    progress.set_ylabel("best validation loss")
    progress.set_title("the study")
    progress.legend(fontsize=7)
    for axes in (curves, progress):
        axes.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
