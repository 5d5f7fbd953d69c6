"""``hvdllm report RUN_DIR``: summary of a run from metrics.jsonl, and its plot redrawn."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from hvdllm.atomic import atomic_path
from hvdllm.errors import UserError
from hvdllm.paths import path_kind, require_file, require_folder
from hvdllm.train.status import FAILED, RUNNING, describe_status, read_status


# Logged values that report and plots compute with: a number, or null for a non-finite one.
NUMERIC_FIELDS = ("loss", "val_loss", "val_ppl", "val_acc", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                  "mfu", "mem_peak_bytes")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        raise UserError(f"{where}: not a metrics record (a JSON object with an integer \"step\")")
    for key in NUMERIC_FIELDS:
        if record.get(key) is not None and not _is_number(record[key]):
            raise UserError(f"{where}: {key!r} must be a number or null, got {record[key]!r}")
    return record


def read_metrics_file(path: str | Path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl, checked; the one reader of that file.

    A last line that does not parse is what a crash in the middle of a write leaves: it is
    dropped (and ``warn`` called with a message). A bad line anywhere else, or a record of
    the wrong shape, is a UserError naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for i, (line_no, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(numbered) - 1:
                if warn is not None:
                    warn(f"{path}:{line_no}: torn last line (an interrupted write) ignored")
                break
            raise UserError(f"{path}:{line_no}: not a JSON line") from None
        records.append(_check_record(record, f"{path}:{line_no}"))
    return records


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The checked records of RUN_DIR/metrics.jsonl (see :func:`read_metrics_file`)."""
    require_folder(run_dir, "run folder")
    path = Path(run_dir) / "metrics.jsonl"
    if path_kind(path) == "missing":
        raise UserError(f"{path}: no metrics (is {run_dir} a run folder?)")
    require_file(path, "metrics log")
    return read_metrics_file(path, warn=_warn)


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
    # Skipped steps (a non-finite loss or gradient) have no loss to summarize.
    train = [r for r in records if r.get("loss") is not None and not r.get("skipped")]
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
        lines.append(f"throughput   median {statistics.median(speeds):,.0f} tokens/s over all ranks "
                     f"(time inside the step; step lines' ms/step is wall clock)")
    mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
    if mfu:
        peak = next((r for r in reversed(train) if r.get("peak_flops")), None)
        source = (f" of {peak['peak_flops'] / 1e12:,.3f} TFLOP/s per rank ({peak.get('peak_flops_source')})"
                  if peak else "")
        lines.append(f"MFU          median {statistics.median(mfu):.2%}{source}")
    return "\n".join(lines)


def _print_summary(run_dir: str | Path) -> None:
    records = read_metrics(run_dir)
    print(summarize(records))
    if any(r.get("loss") is not None for r in records):
        path = Path(run_dir) / "training.png"
        try:
            print(f"plot         {plot_run(records, path)}")
        except OSError as err:  # a read-only run folder: the summary above still stands
            _warn(f"{path}: plot not written: {err.strerror or err}")


def run_report(run_dir: str | Path, job_ended: bool = False, since: float = 0.0) -> int:
    """Print the run's summary, plot and status; the exit status is the run's own: 1 when its
    status.json says it failed.

    Args:
        job_ended: the job is over (a launch script asks), so a run still marked running, or
            with no status written since ``since``, ended without a word (killed): 1 too.
        since: when the job started (seconds since the epoch): an older status.json is a
            previous job's in the same run folder.
    """
    require_folder(run_dir, "run folder")
    status = read_status(run_dir)
    if status is not None and status.get("time", 0.0) < since:
        status = None
    if status is None and job_ended:
        return _ended_without_a_word(run_dir, "no status.json written by this job")
    if status is None or path_kind(Path(run_dir) / "metrics.jsonl") != "missing":
        _print_summary(run_dir)  # a run that failed before its first step has no metrics
    if status is None:
        return 0
    print(f"status       {describe_status(status)}")
    if status["state"] == FAILED:
        return 1
    if job_ended and status["state"] == RUNNING:
        return _ended_without_a_word(run_dir, "status.json still says running")
    return 0


def _ended_without_a_word(run_dir: str | Path, said: str) -> int:
    print(f"error: {run_dir}: the job ended without saying how the run did ({said}): a rank was killed, "
          f"or the job ended before training started", file=sys.stderr, flush=True)
    return 1
