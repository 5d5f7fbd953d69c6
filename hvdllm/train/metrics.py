"""Monitoring on rank 0: metrics.jsonl, TensorBoard events and a tqdm bar."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from hvdllm.atomic import write_text_atomic


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocated CUDA memory on a GPU, else the process's max RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def guess_peak_flops(device: torch.device, threads: int) -> float:
    """Dense bf16/fp32 peak FLOP/s of one rank's device, for MFU when none is configured.

    GPUs by name (dense bf16 tensor-core peaks from the vendors' data sheets); a CPU core is
    taken as 3 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units), a rough ceiling.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("V100", 125e12),
                           ("A10", 125e12), ("L40", 181e12), ("4090", 165e12)):
            if key in name:
                return flops
        return 0.0
    return threads * 3e9 * 32


def start_run_log(run_dir: Path, config_toml: str, log_cfg, total_steps: int, step: int,
                  resumed: bool) -> "MetricsLogger":
    """Create the run folder with its resolved config.toml and open the metrics log: a
    resumed run keeps the lines up to its checkpoint's ``step`` (later ones are replayed), a
    fresh run starts an empty one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.toml", config_toml)
    metrics = run_dir / "metrics.jsonl"
    if resumed and metrics.exists():
        kept = [line for line in metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(metrics, "".join(line + "\n" for line in kept))
    elif not resumed:
        metrics.unlink(missing_ok=True)
    return MetricsLogger(run_dir, total_steps, log_cfg.tensorboard, log_cfg.progress, start_step=step)


class MetricsLogger:
    """One JSON object per logged step; TensorBoard scalars; a progress bar. Rank 0 only."""

    def __init__(self, run_dir: str | Path, total_steps: int, tensorboard: bool, progress: bool,
                 start_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.bar = None
        self.plain_lines = False  # progress as one line per logged step (not a terminal)
        self.total_steps = total_steps
        if progress:
            from tqdm import tqdm

            # disable=None: a bar on a terminal only; under mpirun/horovodrun (a pipe) the
            # carriage-return redraws would turn into a wall of text, so print lines instead.
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, disable=None)
            if self.bar.disable:
                self.bar, self.plain_lines = None, True

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])
        shown = {k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "val_ppl", "lr", "tokens_per_s")
                 if isinstance(record.get(k), (int, float))}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        elif self.plain_lines:
            print(f"step {record['step']}/{self.total_steps} " + " ".join(f"{k} {v}" for k, v in shown.items()),
                  flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        """A line on screen that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
