"""The study behind ``hvdllm tune``: Optuna's RDB storage in ``<study folder>/study.db``
(SQLite), so that running the same command again resumes it; its sampler and pruner; a lock so
that one tuner at a time drives it; and the recovery of trials a stopped tuner left behind.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hvdllm.config import Config, ConfigError, TuneConfig
from hvdllm.errors import UserError
from hvdllm.tune.space import SET_BY_TUNER, Dimension

STUDY_NAME = "hvdllm-tune"
DB_NAME = "study.db"
# A trial the tuner itself stopped (Ctrl-C, SIGTERM, the tuner killed): failed in the
# storage, but not counted as done; its parameters run again as a new trial.
INTERRUPTED = "interrupted"
REQUEUED = "requeued"


def trial_dir(folder: Path, number: int) -> Path:
    return folder / f"trial-{number:04d}"


def lock_study(folder: Path) -> IO:
    """Create ``folder`` and hold its lock for as long as the returned file stays open: a
    second tuner on the same study would take the first one's running trials for stale."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "tune.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"the study in {folder} is in use by another `hvdllm tune`: wait for it or set tune.study") \
            from None
    return handle


def _database_error(err: BaseException) -> str | None:
    """The SQLite error behind ``err`` (SQLAlchemy wraps it; Optuna may raise its own error
    while handling it, leaving it as the context), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        orig = getattr(err, "orig", None)  # SQLAlchemy's DBAPIError keeps the driver's error
        for candidate in (err, orig):
            if isinstance(candidate, sqlite3.Error):
                return str(candidate).splitlines()[0] if str(candidate) else type(candidate).__name__
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def storage_errors(folder: Path) -> Iterator[None]:
    """A failure of the study's storage (a full disk, a read-only folder) as one line naming the
    database and SQLite's error: a failed write of a trial's result otherwise surfaces as
    Optuna's own "Should not reach." assertion."""
    try:
        yield
    except Exception as err:
        cause = _database_error(err)
        if cause is None:
            raise
        raise UserError(f"{folder / DB_NAME}: the study's storage failed: {cause}") from err


def counts_as_done(trial: FrozenTrial) -> bool:
    """Finished by its own doing (complete, pruned, or failed), not stopped by the tuner."""
    if trial.state == TrialState.FAIL:
        return not trial.user_attrs.get(INTERRUPTED, False)
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def build_sampler(settings: TuneConfig, space: list[Dimension], trials_so_far: int) -> optuna.samplers.BaseSampler:
    if settings.sampler == "grid":  # it skips the grid points the storage already holds
        grid = {d.key: d.grid_values() for d in space}
        return optuna.samplers.GridSampler(grid, seed=settings.seed)
    # A resumed study starts a fresh sampler: seeded as before, it would draw the first
    # trials' parameters again, so the seed moves on with the trials already there.
    seed = settings.seed + trials_so_far
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(settings: TuneConfig) -> optuna.pruners.BasePruner:
    if not settings.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup_trials,
                                       n_warmup_steps=settings.prune_warmup_steps)


def grid_size(space: list[Dimension]) -> int:
    size = 1
    for dimension in space:
        size *= len(dimension.grid_values())
    return size


def _check_space(study: optuna.Study, space: list[Dimension], folder: Path) -> None:
    described = [d.describe() for d in space]
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", described)
        return
    if stored != described:
        old, new = ({d["key"]: d for d in s} for s in (stored, described))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(f"tune.space differs from the one the study in {folder} was started with (changed: "
                          f"{', '.join(changed)}): restore it, or set tune.study to a new folder")


def fixed_settings(cfg: Config, space: list[Dimension]) -> dict[str, Any]:
    """What every trial trains with, as {"section.key": value} (JSON's types): the config file
    and the command line's overrides resolved, less the [tune] section, the searched fields and
    what the tuner sets per trial."""
    fields = dataclasses.asdict(cfg)
    phases = fields.pop("phases")
    fields.pop("tune")
    flat = {f"{section}.{key}": value for section, values in fields.items() for key, value in values.items()}
    for key in (*SET_BY_TUNER, *(d.key for d in space)):
        flat.pop(key)
    return json.loads(json.dumps({**flat, "phases": phases}))


def _check_fixed(study: optuna.Study, fixed: dict[str, Any], folder: Path) -> None:
    """Trials of another step count, batch or model are not comparable: once a trial has
    finished, the study keeps the settings it ran with. Until then (every trial interrupted,
    to run again) the current ones replace them."""
    stored = study.user_attrs.get("fixed")
    finished = sum(counts_as_done(t) for t in study.get_trials(deepcopy=False))
    if stored is None or not finished:
        study.set_user_attr("fixed", fixed)
        return
    changed = sorted(k for k in stored.keys() | fixed.keys() if stored.get(k) != fixed.get(k))
    if changed:
        what = ", ".join(f"{k} = {stored.get(k)!r}, now {fixed.get(k)!r}" for k in changed)
        raise ConfigError(f"the study in {folder} has {finished} trials finished with other training settings "
                          f"({what}): rerun with its config and --section.key overrides, or set tune.study to a "
                          f"new folder")


def open_study(folder: Path, settings: TuneConfig, space: list[Dimension], fixed: dict[str, Any]) -> optuna.Study:
    """The study in ``folder`` (created, or loaded when it exists), with its space and its
    trials' fixed settings (:func:`fixed_settings`) checked."""
    # The tuner prints its own line per trial (Optuna's for a failed one has a traceback).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / DB_NAME).resolve()}")
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize", load_if_exists=True)
    _check_space(study, space, folder)
    _check_fixed(study, fixed, folder)
    study.sampler = build_sampler(settings, space, len(study.trials))
    study.pruner = build_pruner(settings)
    return study


def requeue_interrupted(study: optuna.Study, folder: Path) -> int:
    """Trials a previous tuner left running (it was killed) or stopped: each is marked failed
    and interrupted, its half-written run folder removed, and its parameters queued to run
    again. Call with the study locked (every running trial is then stale). Returns how many."""
    storage = study._storage  # Optuna's public API offers no way to fail a stale trial
    requeued = set(study.user_attrs.get(REQUEUED, []))  # a finished trial's attributes are frozen
    before = len(requeued)
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get(INTERRUPTED)):
            continue
        if trial.number in requeued:
            continue
        shutil.rmtree(trial_dir(folder, trial.number), ignore_errors=True)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        requeued.add(trial.number)
        study.set_user_attr(REQUEUED, sorted(requeued))
        print(f"trial {trial.number} was interrupted: its folder removed, its parameters queued again",
              file=sys.stderr, flush=True)
    return len(requeued) - before
