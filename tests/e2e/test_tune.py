"""`hvdllm tune` end to end on gpt-nano: every trial a real `hvdllm train` job under mpirun, a
real SQLite study. A study runs, prunes a hopeless trial by stopping its job, reports values
read from the trials' metrics, resumes without rerunning a trial (also after the tuner itself
is stopped), runs 2-rank trials, and refuses a bad space before anything starts."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.corpus import NANO, clean_env, error_lines, hvdllm, read_metrics

STEPS = 200


def tune_config(folder: Path, tune: str) -> Path:
    """The nano test config plus a [tune] section."""
    path = folder / "tune.toml"
    path.write_text(Path(NANO).read_text() + "\n" + tune)
    return path


def tune_args(config: Path, data: Path, study: Path, *extra: str) -> list[str]:
    return ["tune", "--config", str(config), "--study", str(study), f"--data.path={data}", "--train.threads=1",
            f"--train.steps={STEPS}", "--train.eval_every=10", "--checkpoint.every=0", *extra]


def rows(study: Path) -> list[dict]:
    with open(study / "trials.csv") as f:
        return list(csv.DictReader(f))


def trial_metrics(study: Path, trial: int) -> list[dict]:
    return read_metrics(study / f"trial-{trial:04d}")


def val_losses(records: list[dict]) -> list[float]:
    return [r["val_loss"] for r in records if r.get("val_loss") is not None]


def processes_with(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a study folder): none may outlive a study."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and text in cmdline and int(entry.name) != os.getpid():
            found.append(cmdline)
    return found


# A grid over three learning rates; with seed 0 the grid runs 2e-3, 1e-7, 3e-3. 1e-7 barely
# moves the model: once a trial has completed (prune_startup_trials = 1), its first validation
# loss is above the median and the job is stopped long before step 200.
PRUNING = """[tune]
sampler = "grid"
seed = 0
prune_startup_trials = 1

[tune.space]
"optim.lr" = [3e-3, 1e-7, 2e-3]
"""


def test_a_study_prunes_the_hopeless_trial_and_reports_real_losses(data, tmp_path):
    study = tmp_path / "study"
    run = hvdllm(*tune_args(tune_config(tmp_path, PRUNING), data, study), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = {int(r["trial"]): r for r in rows(study)}
    assert sorted(table) == [0, 1, 2]
    by_lr = {float(r["optim.lr"]): r for r in table.values()}
    assert set(by_lr) == {3e-3, 1e-7, 2e-3}
    hopeless = by_lr[1e-7]
    assert int(hopeless["trial"]) > 0, "the grid order changed: the hopeless trial must not come first"
    assert hopeless["state"] == "pruned"
    assert [r["state"] for r in table.values()].count("complete") == 2
    for number, row in table.items():
        records = trial_metrics(study, number)
        # The value is the best validation loss the trial's own job logged, and its steps its last step.
        assert float(row["val_loss"]) == pytest.approx(min(val_losses(records)), rel=1e-12)
        assert int(row["steps"]) == records[-1]["step"]
        if row["state"] == "complete":
            assert records[-1]["step"] == STEPS
    # Pruned means stopped: the job ended (cleanly, on the stop signal) far before its last step.
    pruned_log = (study / f"trial-{int(hopeless['trial']):04d}" / "train.log").read_text()
    assert int(hopeless["steps"]) < STEPS / 2 and "stop requested" in pruned_log
    best = min((r for r in table.values() if r["state"] == "complete"), key=lambda r: float(r["val_loss"]))
    assert f"best: trial {best['trial']}, val_loss {float(best['val_loss']):.4f}" in run.stdout
    assert f"  --optim.lr={float(best['optim.lr'])!r}\n" in run.stdout
    result = json.loads((study / "trials.json").read_text())
    assert result["best"]["overrides"] == f"--optim.lr={float(best['optim.lr'])!r}"
    assert [p[1] for p in result["trials"][0]["curve"]] == val_losses(trial_metrics(study, 0))
    assert (study / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert processes_with(str(study)) == []


def test_without_pruning_every_trial_runs_to_the_end(data, tmp_path):
    study = tmp_path / "study"
    run = hvdllm(*tune_args(tune_config(tmp_path, PRUNING), data, study, "--tune.prune=false"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [(r["state"], r["steps"]) for r in rows(study)] == [("complete", str(STEPS))] * 3


SEARCH = """[tune]
sampler = "random"
seed = 3

[tune.space]
"optim.lr" = { log = [1e-3, 1e-2] }
"optim.weight_decay" = [0.0, 0.1]
"""


def test_two_rank_trials_and_a_resumed_study_runs_only_the_missing_trial(data, tmp_path):
    config, study = tune_config(tmp_path, SEARCH), tmp_path / "study"
    first = hvdllm(*tune_args(config, data, study, "--trials", "2", "--ranks", "2"), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["state"] for r in rows(study)] == ["complete", "complete"]
    # 2 ranks per trial: each job's log says so.
    assert "2 rank(s) each" in first.stdout
    log = (study / "trial-0000" / "train.log").read_text()
    assert "world        2 rank(s): data 2 x pipeline 1" in log, log[:2000]
    before = {n: (study / f"trial-{n:04d}" / "metrics.jsonl").stat().st_mtime_ns for n in (0, 1)}
    again = hvdllm(*tune_args(config, data, study, "--trials", "3", "--ranks", "2"), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 3 trials done, 1 to run" in again.stdout
    assert re.findall(r"^trial (\d+): ", again.stdout, re.M) == ["2"]
    assert {n: (study / f"trial-{n:04d}" / "metrics.jsonl").stat().st_mtime_ns for n in (0, 1)} == before
    table = rows(study)
    assert [r["trial"] for r in table] == ["0", "1", "2"] and all(r["state"] == "complete" for r in table)
    assert len({r["optim.lr"] for r in table}) == 3  # the resumed sampler does not draw trial 0 again
    # Nothing left to do: a third run only reports.
    done = hvdllm(*tune_args(config, data, study, "--trials", "3", "--ranks", "2"), timeout=600)
    assert done.returncode == 0 and "3 of 3 trials done, 0 to run" in done.stdout
    # The same study with another space is refused in one line.
    other = tmp_path / "other"
    other.mkdir()
    changed = hvdllm(*tune_args(tune_config(other, SEARCH.replace("1e-3, 1e-2", "1e-4, 1e-2")), data, study,
                                "--trials", "4"))
    assert changed.returncode == 2
    assert error_lines(changed) == [f"error: tune.space differs from the one the study in {study} was started with "
                                    "(changed: optim.lr): restore it, or set tune.study to a new folder"]


@pytest.mark.parametrize("space, culprit", [
    ('"optim.lrr" = { log = [1e-4, 1e-2] }',
     'tune.space["optim.lrr"]: unknown key optim.lrr (did you mean \'lr\'?)'),
    ('"optim.lr" = { uniform = [-1e-3, 1e-2] }',
     'tune.space["optim.lr"]: -0.001 is not a valid value: optim.lr must be > 0, got -0.001'),
    ('"optim.lr" = { log = 0.001 }', 'tune.space["optim.lr"]: log must be [low, high], got 0.001'),
])
def test_a_bad_space_is_one_line_before_anything_starts(data, tmp_path, space, culprit):
    study = tmp_path / "study"
    run = hvdllm(*tune_args(tune_config(tmp_path, f"[tune.space]\n{space}\n"), data, study))
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"error: {culprit}"]
    assert not study.exists()  # no study file, no trial folder: no job was launched


def test_trials_that_all_fail_alike_end_the_study_with_their_error(data, tmp_path):
    study = tmp_path / "study"
    config = tune_config(tmp_path, SEARCH)
    run = hvdllm(*tune_args(config, tmp_path / "missing", study, "--trials", "2"), timeout=600)
    assert run.returncode == 2
    assert [r["state"] for r in rows(study)] == ["failed", "failed"]
    (line,) = error_lines(run)
    assert line.startswith("error: every trial of the study failed (2) the same way: exit status ")
    assert str(tmp_path / "missing") in line and line.count("error:") == 2  # the jobs' own error line
    assert re.findall(r"^trial (\d+): failed \(exit status", run.stdout, re.M) == ["0", "1"]


def test_a_stopped_tuner_stops_its_trial_and_the_next_run_redoes_it(data, tmp_path):
    """SIGTERM to the tuner (a batch system ending it) in the middle of a trial: the trial's
    job is stopped, no process is left, and the same command then runs that trial again
    with the same parameters (the interrupted one does not count)."""
    config, study = tune_config(tmp_path, SEARCH), tmp_path / "study"
    args = tune_args(config, data, study, "--trials", "2", "--train.steps=100000", "--train.eval_every=50")
    tuner = subprocess.Popen([sys.executable, "-m", "hvdllm", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=clean_env())
    metrics = study / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and "val_loss" in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    tuner.send_signal(signal.SIGTERM)
    out, err = tuner.communicate(timeout=120)
    assert tuner.returncode == 130, err[-3000:]
    assert "tune: interrupted; run the same command again" in err
    assert processes_with(str(study)) == []
    assert [r["state"] for r in rows(study)] == ["interrupted"]
    interrupted_lr = rows(study)[0]["optim.lr"]
    again = hvdllm(*tune_args(config, data, study, "--trials", "1"), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 0 was interrupted: its folder removed, its parameters queued again" in again.stderr
    assert "0 of 1 trials done, 1 to run" in again.stdout
    table = rows(study)
    assert [(r["trial"], r["state"]) for r in table] == [("0", "interrupted"), ("1", "complete")]
    assert table[1]["optim.lr"] == interrupted_lr
    assert not (study / "trial-0000").exists() and trial_metrics(study, 1)[-1]["step"] == STEPS


def test_a_leftover_trial_folder_is_removed_only_if_a_trial_made_it(tmp_path):
    """A trial folder the study's storage no longer knows is replaced when it holds a trial's
    train.log, never when it holds only a user's files."""
    from hvdllm.errors import UserError
    from hvdllm.tune.trial import run_trial

    folder = tmp_path / "trial-0000"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=f"^trial folder {folder} is a folder that is not an earlier hvdllm tune"):
        run_trial(None, ["true"], folder)
    assert (folder / "notes.txt").read_text() == "keep"

