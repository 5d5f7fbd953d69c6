"""``hvdllm bench grow``: a large model trained from a grown small one against the same model
from scratch, in one run (issue: warm start from a smaller model, seed §7.3).

Three ``hvdllm train`` jobs on the same config and data: the small model (the config's
``[model]`` with ``--small`` applied) for ``--small-steps``; the config's model started from
the small run's best checkpoint (``train.init_from`` of its run folder, grown on the fly) for
``--steps``; and the same model from scratch for ``--steps``. Reported: the wall time and
tokens each large run needs to first reach a validation loss (by default what the scratch run
reaches three quarters into its run), and the grown run's ratios to scratch, both for the
large run alone and with the small model's training time added (the cost of the whole path).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hvdllm.bench.curves import first_reaching, loss_at_fraction, plot_loss_curves, run_for_curve, tokens_per_step
from hvdllm.bench.options import GrowBenchOptions
from hvdllm.errors import UserError


def _train(options, overrides: list[str], run_dir: Path, steps: int, *extra: str) -> list[dict]:
    command = [sys.executable, "-m", "hvdllm", "train", "--config", options.config, *overrides,
               f"--train.steps={steps}", f"--train.eval_every={options.eval_every}", f"--train.run_dir={run_dir}",
               "--checkpoint.every=0", "--log.plot=false", "--log.progress=false", "--log.tensorboard=false", *extra]
    return run_for_curve(command, run_dir, options.timeout)


def bench_grow(options: GrowBenchOptions, overrides: list[str]) -> dict:
    from hvdllm.config import load_config
    from hvdllm.data.shards import read_manifest
    from hvdllm.model import gpt_config_from
    from hvdllm.model.growth import growth_problem

    small_settings = [f"--{setting}" for setting in options.small]
    # A bad --small setting, or a small model that cannot grow into the large one: one line, before any run.
    small_cfg, large_cfg = (load_config(options.config, extra) for extra in ([*overrides, *small_settings], overrides))
    vocab = read_manifest(large_cfg.data.path)["vocab_size"]
    problem = growth_problem(gpt_config_from(small_cfg.model, vocab), gpt_config_from(large_cfg.model, vocab))
    if problem:
        raise UserError(f"--small {','.join(options.small)}: {problem}")
    per_step = tokens_per_step(options.config, overrides, ranks=1)  # every job is one process
    with tempfile.TemporaryDirectory(prefix="hvdllm-grow-") as tmp:
        folder = Path(tmp)
        small = _train(options, [*overrides, *small_settings], folder / "small", options.small_steps)
        grown = _train(options, overrides, folder / "grown", options.steps, f"--train.init_from={folder / 'small'}")
        scratch = _train(options, overrides, folder / "scratch", options.steps)
    target = options.target_loss or loss_at_fraction(scratch, options.steps)
    small_time = small[-1]["elapsed_s"]
    cases = {}
    for name, curve in (("grown", grown), ("scratch", scratch)):
        hit = first_reaching(curve, target)
        cases[name] = {"curve": curve, "final_val_loss": curve[-1]["val_loss"],
                       "time_to_target_s": hit["elapsed_s"] if hit else None,
                       "tokens_to_target": hit["step"] * per_step if hit else None}
    grown_case, scratch_case = cases["grown"], cases["scratch"]
    reached = grown_case["time_to_target_s"] is not None and scratch_case["time_to_target_s"]
    return {"benchmark": "grow", "config": options.config, "overrides": overrides, "small": list(options.small),
            "small_steps": options.small_steps, "steps": options.steps, "tokens_per_step": per_step,
            "target_val_loss": target, "small_curve": small, "small_train_time_s": small_time,
            "small_final_val_loss": small[-1]["val_loss"], "cases": cases,
            "time_ratio_grown_over_scratch": grown_case["time_to_target_s"] / scratch_case["time_to_target_s"]
            if reached else None,
            "time_ratio_with_small_training": (grown_case["time_to_target_s"] + small_time) /
            scratch_case["time_to_target_s"] if reached else None,
            "tokens_ratio_grown_over_scratch": grown_case["tokens_to_target"] / scratch_case["tokens_to_target"]
            if reached else None}


def plot_grow(result: dict, path: str | Path) -> Path:
    """Validation loss against wall time: the small run, the grown run after it, and scratch."""
    lines = [{"label": "small model", "curve": result["small_curve"], "linestyle": ":"},
             {"label": "grown (after the small run)", "curve": result["cases"]["grown"]["curve"], "linestyle": "-",
              "offset_s": result["small_train_time_s"]},
             {"label": "scratch", "curve": result["cases"]["scratch"]["curve"], "linestyle": "--"}]
    return plot_loss_curves(lines, result["target_val_loss"], "large model: grown from a small one vs from scratch",
                            path)
