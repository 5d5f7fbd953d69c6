"""``hvdllm tune``: check the search space, open (or resume) the study, run the missing trials
one after another, then report. See :mod:`hvdllm.tune` for the parts."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import optuna

from hvdllm.config import Config
from hvdllm.errors import UserError
from hvdllm.tune.report import (ERROR, STEPS, VAL_CURVE, WALL_S, best_overrides, best_row, format_table, plot_study,
                                trial_rows, write_tables)
from hvdllm.tune.space import Dimension, parse_space
from hvdllm.tune.study import (INTERRUPTED, counts_as_done, fixed_settings, grid_size, lock_study, open_study,
                               requeue_interrupted, storage_errors, trial_dir)
from hvdllm.tune.trial import run_trial, train_command


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """A SIGTERM (a batch system ending the job, `kill`) stops the tuner like Ctrl-C does: the
    running trial's job is stopped and the trial left to run again on the next start."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(text: str) -> None:
    print(text, flush=True)


class TrialFailed(Exception):
    """A trial's job failed: the trial is marked failed and the study goes on."""


def run_one_trial(study: optuna.Study, space: list[Dimension], folder: Path, ranks: int, config: str | None,
                  overrides: list[str]) -> None:
    """One trial through ``study.optimize`` (Optuna's grid sampler stops the study from
    inside it once the grid is done, which only works there)."""

    def objective(trial: optuna.Trial) -> float:
        try:  # wherever a Ctrl-C lands in the trial, it is run again on the next start
            params = {d.key: d.suggest(trial) for d in space}
            run_dir = trial_dir(folder, trial.number)
            result = run_trial(trial, train_command(ranks, config, overrides, params, run_dir), run_dir)
            for key, value in ((VAL_CURVE, result.val_losses), (STEPS, result.steps), (WALL_S, result.wall_s),
                               (ERROR, result.error)):
                trial.set_user_attr(key, value)
        except KeyboardInterrupt:  # Optuna marks the trial failed and raises it again
            trial.set_user_attr(INTERRUPTED, True)
            raise
        shown = " ".join(f"{key}={value!r}" for key, value in params.items())
        if result.state == "complete":
            _say(f"trial {trial.number}: complete, val_loss {result.best_val_loss:.4f} ({result.steps} steps, "
                 f"{result.wall_s:.1f} s): {shown}")
            return result.best_val_loss
        if result.state == "pruned":
            _say(f"trial {trial.number}: pruned at step {result.steps} (best val_loss {result.best_val_loss:.4f}, "
                 f"{result.wall_s:.1f} s): {shown}")
            raise optuna.TrialPruned()
        _say(f"trial {trial.number}: failed ({result.error}); log: {run_dir / 'train.log'}: {shown}")
        raise TrialFailed(result.error)

    study.optimize(objective, n_trials=1, catch=(TrialFailed,))


def report_study(study: optuna.Study, space: list[Dimension], folder: Path) -> list[dict]:
    """Print the table and the best overrides; write trials.csv, trials.json and tune.png."""
    keys = [d.key for d in space]
    rows = trial_rows(study.get_trials(deepcopy=False), keys)
    if not rows:
        return rows
    write_tables(folder, rows, keys)
    plot_study(rows, folder / "tune.png")
    _say("\n" + format_table(rows, keys))
    best = best_row(rows)
    if best is not None:
        _say(f"\nbest: trial {best['trial']}, val_loss {best['val_loss']:.4f}; train with:\n"
             f"  {best_overrides(best, keys)}")
    _say(f"wrote {folder}/trials.csv, trials.json, tune.png")
    return rows


def _refuse_all_failed(rows: list[dict]) -> None:
    ended = [r for r in rows if r["state"] != "interrupted"]
    if ended and all(r["state"] == "failed" for r in ended):
        errors = {r["error"] for r in ended}
        how = f"the same way: {errors.pop()}" if len(errors) == 1 else f"(the first: {ended[0]['error']})"
        raise UserError(f"every trial of the study failed ({len(ended)}) {how}")


def run_tune(cfg: Config, config: str | None, overrides: list[str]) -> int:
    """Run ``cfg.tune.trials`` finished trials in all in the study (those it holds count).

    Args:
        config: the config file every trial trains with (also the base of the space's checks).
        overrides: the command line's ``--section.key=value``; all but ``--tune.*`` go to every trial.
    """
    settings = cfg.tune
    train_overrides = [o for o in overrides if not o.lstrip("-").startswith("tune.")]
    space = parse_space(settings.space, config, train_overrides)  # before anything is created
    target = settings.trials
    if settings.sampler == "grid" and grid_size(space) < target:
        _say(f"tune: the grid has {grid_size(space)} points: running those, not tune.trials = {target}")
        target = grid_size(space)
    folder = Path(settings.study or Path(cfg.train.run_dir) / "tune")
    # The lock is held while the returned file stays open.
    with lock_study(folder), storage_errors(folder):
        study = open_study(folder, settings, space, fixed_settings(cfg, space))
        requeue_interrupted(study, folder)
        done = sum(counts_as_done(t) for t in study.get_trials(deepcopy=False))
        _say(f"tune: study {folder}: {done} of {target} trials done, {max(target - done, 0)} to run, "
             f"{settings.ranks} rank(s) each, sampler {settings.sampler}, pruning {'on' if settings.prune else 'off'}")
        try:
            with _sigterm_interrupts():
                for _ in range(target - done):
                    run_one_trial(study, space, folder, settings.ranks, config, train_overrides)
        except KeyboardInterrupt:
            report_study(study, space, folder)
            sys.stderr.write("tune: interrupted; run the same command again to run the missing trials\n")
            raise
        _refuse_all_failed(report_study(study, space, folder))
        return 0
