"""Monitoring on rank 0: metrics.jsonl, TensorBoard events and a tqdm bar."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hvdllm.atomic import write_json_atomic, write_text_atomic
from hvdllm.optim.build import state_bytes_held
from hvdllm.train.report import read_metrics_file


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocated CUDA memory on a GPU, else the process's max RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# Dense peaks from the vendors' data sheets, FLOP/s: (bf16/fp16 tensor cores, fp32 without
# TF32, which torch leaves off for matmuls by default). Longer names first: "A100" holds "A10".
_GPU_PEAKS = (("H200", 989e12, 67e12), ("H100", 989e12, 67e12), ("A100", 312e12, 19.5e12),
              ("V100", 125e12, 15.7e12), ("A10", 125e12, 31.2e12), ("L40", 181e12, 90.5e12),
              ("4090", 165e12, 82.6e12))


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of one rank for MFU, in the precision trained, and where it came from:
    ``train.peak_flops``; a GPU's data sheet; else measured by a matmul probe on this
    device with this rank's threads (cached, see :func:`measured_matmul_flops`)."""
    if configured > 0:
        return configured, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # fp32 matmuls run on TF32 tensor cores (half the bf16 rate) when torch allows it.
        tf32 = precision == "fp32" and torch.backends.cuda.matmul.allow_tf32
        for key, half, single in _GPU_PEAKS:
            if key in name:
                peak = half / 2 if tf32 else single if precision == "fp32" else half
                return peak, f"{key} data sheet, {'tf32' if tf32 else precision}"
    flops, cache = measured_matmul_flops(device, precision)
    return flops, f"measured: {precision} matmul probe, cached in {cache}"


def measured_matmul_flops(device: torch.device, precision: str) -> tuple[float, Path]:
    """The best FLOP/s of a square matmul in ``precision`` (what a transformer's time goes
    to), cached per device, precision and thread count so a run pays the ~0.5 s once."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    key = f"{name}|{precision}|threads={torch.get_num_threads()}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvdllm" / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = _probe_matmul(device, {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, torch.half))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, known)
        except OSError:
            pass  # a read-only home: measure again next time
    return float(known[key]), cache


def _probe_matmul(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.1) -> float:
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(4):  # the first round warms up caches and kernels
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, done * 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_run_log(run_dir: Path, config_toml: str, log_cfg, total_steps: int, step: int,
                  resumed: bool) -> "MetricsLogger":
    """Create the run folder with its resolved config.toml and open the metrics log: a
    resumed run keeps the lines up to its checkpoint's ``step`` (later ones are replayed) and
    its elapsed time goes on from the last of them, a fresh run starts an empty one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.toml", config_toml)
    metrics = run_dir / "metrics.jsonl"
    elapsed = 0.0
    if resumed and metrics.exists():
        # A torn last line (the crash that made this a resume) is dropped with the rest.
        kept = [record for record in read_metrics_file(metrics) if record["step"] <= step]
        write_text_atomic(metrics, "".join(json.dumps(record) + "\n" for record in kept))
        elapsed = next((r["elapsed_s"] for r in reversed(kept) if r.get("elapsed_s") is not None), 0.0)
    elif not resumed:
        metrics.unlink(missing_ok=True)
    return MetricsLogger(run_dir, total_steps, log_cfg.tensorboard, log_cfg.progress, start_step=step,
                         elapsed_s=elapsed)


class MetricsLogger:
    """One JSON object per logged step; TensorBoard scalars; a progress bar. Rank 0 only."""

    def __init__(self, run_dir: str | Path, total_steps: int, tensorboard: bool, progress: bool,
                 start_step: int = 0, elapsed_s: float = 0.0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.bar = None  # without a bar, each logged step prints a line
        self.total_steps = total_steps
        now = time.monotonic()
        self.started = now - elapsed_s  # a resumed run's clock goes on from its last logged step
        self._interval_start, self._interval_step = now, start_step  # for the mean step time
        if progress:
            from tqdm import tqdm

            # disable=None: a bar on a terminal only; under mpirun/horovodrun (a pipe) the
            # carriage-return redraws would turn into a wall of text, so print lines instead.
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, disable=None)
            if self.bar.disable:
                self.bar = None

    def log(self, record: dict) -> None:
        """Append ``record`` (a non-finite number is written as null), with the seconds since
        the start and the wall-clock step time averaged since the previous logged step
        (evaluations and checkpoints included), and show it."""
        now = time.monotonic()
        steps = record["step"] - self._interval_step
        record = {**record, "elapsed_s": now - self.started,
                  "interval_step_s": (now - self._interval_start) / steps if steps > 0 else None}
        self._interval_start, self._interval_step = now, record["step"]
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])
                elif key.endswith("_hist") and value:  # counts per value 0, 1, ... (e.g. staleness)
                    counts = torch.tensor(value)
                    self.tb.add_histogram(key, torch.arange(len(value)).repeat_interleave(counts), record["step"])
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(step_fields(record)), refresh=False)
        else:
            eta = (record["interval_step_s"] or 0.0) * (self.total_steps - record["step"])
            fields = [f"step {record['step']}/{self.total_steps}", *step_fields(record),
                      f"elapsed {duration(record['elapsed_s'])}", f"eta {duration(eta)}"]
            print(" | ".join(fields), flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        """A line on screen that does not break the progress bar; warnings and errors go to
        stderr, so a user who redirects the log still sees them."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr if message.startswith(("warning:", "error:")) else sys.stdout)
        else:
            print_line(message)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


# One number format for everything printed: losses to 4 decimals, lr in e-notation, rates
# with thousands separators, step times in ms, durations as h:mm:ss.
def step_fields(record: dict) -> list[str]:
    """The printed fields of a metrics record (non-finite and missing values left out,
    a skipped step said as such)."""
    def number(key):
        value = record.get(key)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    fields = ["loss " + (f"{number('loss'):.4f}" if number("loss") is not None else "n/a")]
    if record.get("skipped"):
        fields[0] += " (skipped: non-finite)"
    for key, text in (("val_loss", "val_loss {:.4f}"), ("val_ppl", "val_ppl {:.2f}"), ("lr", "lr {:.2e}"),
                      ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "mfu {:.2%}")):
        if number(key) is not None:
            fields.append(text.format(number(key)))
    if number("epochs") is not None:
        fields.append(f"epoch {number('epochs'):.2f}")
    if number("interval_step_s") is not None:
        fields.append(f"{number('interval_step_s') * 1000:,.1f} ms/step")
    return fields


def print_line(message: str) -> None:
    """Print a line: warnings and errors to stderr, anything else to stdout."""
    print(message, file=sys.stderr if message.startswith(("warning:", "error:")) else sys.stdout, flush=True)


@dataclass
class StepResult:
    """What one optimizer step did, as the Trainer's train_step returns it."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    stop_requested: bool
    step_time_s: float
    tokens: int


def step_record(trainer, result: StepResult) -> dict:
    """The metrics of one finished step (a trainer's StepResult) as a JSON-ready dict. MFU
    counts every rank's peak, with where the peak came from."""
    tokens_per_s = result.tokens / result.step_time_s if result.step_time_s > 0 else 0.0
    mfu = None
    if trainer.peak_flops > 0:
        flops = tokens_per_s * trainer.flops_per_token[trainer.phases.current.index]
        mfu = flops / (trainer.peak_flops * trainer.strategy.world_size)
    loader = trainer.phases.loader
    return {"step": trainer.step, "phase": trainer.phases.current.index, "epoch": loader.epoch,
            "epochs": loader.epoch + loader.batch / loader.batches_per_epoch,
            "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "skipped": result.skipped,
            "tokens_per_s": tokens_per_s, "step_time_s": result.step_time_s, "mfu": mfu,
            "peak_flops": trainer.peak_flops or None, "peak_flops_source": trainer.peak_flops_source or None,
            "mem_peak_bytes": peak_memory_bytes(trainer.device),
            "optimizer_state_bytes": state_bytes_held(trainer.optimizer), **trainer.strategy.step_metrics()}


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def hosts_line(hosts: list[str]) -> str:
    """``hostA: ranks 0, 2; hostB: ranks 1, 3`` from each rank's host name, in rank order."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    return "; ".join(f"{host}: rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for host, r in ranks.items())


def world_scaling_note(trainer) -> list[str]:
    """One line when the launched world sets the tokens per step but not the lr."""
    cfg = trainer.cfg
    if trainer.strategy.layout.data == 1 or cfg.data.global_batch_size or cfg.schedule.scale_rule != "none":
        return []
    return [f"note         {trainer.strategy.layout.data} data-parallel ranks take {trainer.strategy.layout.data}x "
            f"one rank's tokens per step, and schedule.scale_rule=none keeps one rank's lr {cfg.optim.lr:.2e}: "
            f"set schedule.scale_rule=linear or sqrt, or data.global_batch_size to hold the batch"]


def data_line(trainer) -> str:
    """How much of the training split the whole run reads, in epochs."""
    data_degree, accum = trainer.strategy.layout.data, trainer.cfg.parallel.accum_steps
    read = sum(p.steps * data_degree * accum * p.batch_size for p in trainer.phases.plan)
    available = len(trainer.train_samples)
    return f"data         {available:,} train samples; the run reads {read:,} = {read / available:.3g} epochs"


def evaluation_line(trainer) -> str:
    """When the run evaluates, or why it cannot (then early stopping cannot either)."""
    train = trainer.cfg.train
    if trainer.val_samples is None:
        return (f"eval         off: {trainer.cfg.data.path} has no val split (prepare with --val-fraction > 0 "
                f"gives one), so early stopping and the best checkpoint are off too")
    every = f"every {train.eval_every} steps and " if train.eval_every else ""
    stop = (f"; early stop after {train.early_stop_patience} without improvement" if train.early_stop_patience
            else "")
    return (f"eval         {every}at the end, {train.eval_batches} batches per rank of {len(trainer.val_samples):,} "
            f"val samples{stop}")


def banner_lines(trainer) -> list[str]:
    """What a run is, printed once at its start on the logging rank."""
    layout, phase, g = trainer.strategy.layout, trainer.phases.plan[0], trainer.gpt_cfg
    samples = layout.data * trainer.cfg.parallel.accum_steps * phase.batch_size
    return [f"model        {trainer.cfg.model.preset}: {trainer.num_params:,} parameters "
            f"({g.n_layer} layers, d_model {g.d_model}, {g.n_head} heads, context {g.block_size})",
            f"world        {layout.world_size} rank(s): data {layout.data} x pipeline {layout.pipeline}"
            + (f" + {layout.servers} servers" if layout.servers else ""),
            f"batch        {samples} samples x {phase.seq_len} tokens = {samples * phase.seq_len:,} tokens per step"
            f" (micro-batch {phase.batch_size} per rank x {trainer.cfg.parallel.accum_steps} accumulation x data "
            f"{layout.data})",
            *world_scaling_note(trainer),
            f"hosts        {hosts_line(trainer.hosts)}",
            f"device       {trainer.device} ({torch.get_num_threads()} threads), precision {trainer.precision.name}"
            + (", blocks compiled (torch.compile)" if trainer.cfg.train.compile else ""),
            f"mfu peak     {trainer.peak_flops / 1e12:,.3f} TFLOP/s per rank ({trainer.peak_flops_source})",
            *trainer.strategy.banner_notes(),
            data_line(trainer), evaluation_line(trainer),
            f"run          steps {trainer.step + 1}..{trainer.total_steps} -> {trainer.run_dir}"]
