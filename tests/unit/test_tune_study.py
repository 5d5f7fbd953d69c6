"""The study of `hvdllm tune` through run_tune with its trials' jobs replaced: what a broken
storage says (no training job runs here)."""

import pytest
from helpers.mounts import tmpfs

from hvdllm.config import load_config
from hvdllm.errors import UserError
from hvdllm.tune import run as tune_run
from hvdllm.tune.trial import TrialResult

pytest.importorskip("optuna")

SPACE = '[tune]\ntrials = 1\n[tune.space]\n"optim.lr" = [1e-3, 2e-3]\n'


def test_a_full_disk_names_the_storage_and_its_error(tmp_path, monkeypatch):
    """The trial's result cannot be stored: Optuna's own "Should not reach." assertion hid the
    storage's error; the line names the study's database and what went wrong."""
    config = tmp_path / "tune.toml"
    config.write_text(SPACE)

    with tmpfs(tmp_path / "disk", size_kb=512) as disk:
        def fill_the_disk(trial, command, run_dir):
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            return TrialResult("complete", val_losses=[(10, 1.0)], steps=10)

        monkeypatch.setattr(tune_run, "run_trial", fill_the_disk)
        cfg = load_config(config, [f"--tune.study={disk / 'study'}"])
        with pytest.raises(UserError) as err:
            tune_run.run_tune(cfg, str(config), [])
    assert str(err.value) == f"{disk / 'study' / 'study.db'}: the study's storage failed: database or disk is full"


def _complete(trial, command, run_dir):
    return TrialResult("complete", val_losses=[(10, 1.0)], steps=10)


def test_a_rerun_with_other_training_settings_is_refused(tmp_path, monkeypatch):
    """Trials of 1500 and of 300 steps are not comparable: the overrides (and the config they
    resolve to) belong to the study like its space; the searched keys and tune.* do not."""
    config = tmp_path / "tune.toml"
    config.write_text(SPACE)
    monkeypatch.setattr(tune_run, "run_trial", _complete)
    study = f"--tune.study={tmp_path / 'study'}"

    def tune(*overrides):
        return tune_run.run_tune(load_config(config, [*overrides, study]), str(config), [*overrides, study])

    assert tune("--train.steps=1500", "--tune.trials=1") == 0
    assert tune("--train.steps=1500", "--tune.trials=2", "--tune.ranks=2") == 0  # tune.* may change
    with pytest.raises(UserError) as err:
        tune("--train.steps=300", "--tune.trials=3")
    assert str(err.value) == (f"the study in {tmp_path / 'study'} has 2 trials finished with other training "
                              "settings (train.steps = 1500, now 300): rerun with its config and --section.key "
                              "overrides, or set tune.study to a new folder")
