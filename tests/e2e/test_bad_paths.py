"""Paths a user gets wrong end a 2-rank job with the same one line on every rank, saying what
the path is."""

from helpers.corpus import error_lines, hvdllm, hvdllm_mpi, train_args
from helpers.mounts import tmpfs


def assert_one_line_on_every_rank(result, message):
    lines = error_lines(result)
    assert result.returncode != 0
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_run_dir_under_a_file(data, tmp_path):
    (tmp_path / "taken").write_text("x")
    result = hvdllm_mpi(2, *train_args(data, tmp_path / "taken" / "run"), timeout=120)
    assert_one_line_on_every_rank(
        result, f"train.run_dir {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file, not a folder")


def test_read_only_run_dir(data, tmp_path):
    with tmpfs(tmp_path / "ro", size_kb=64, read_only=True) as ro:
        result = hvdllm_mpi(2, *train_args(data, ro / "run"), timeout=120)
    assert_one_line_on_every_rank(
        result, f"train.run_dir {ro / 'run'} is not writable (cannot be created in {ro}): Read-only file system")


def test_data_path_that_is_a_file(data, tmp_path):
    result = hvdllm(*train_args(data / "manifest.json", tmp_path / "run"))
    assert result.returncode == 2
    assert error_lines(result) == [f"error: data folder {data / 'manifest.json'} is a file, not a folder"]
