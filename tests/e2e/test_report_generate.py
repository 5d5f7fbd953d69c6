"""`hvdllm report` and `hvdllm generate` on what runs leave behind: torn metrics, read-only
folders, run folders instead of checkpoint files, bad devices."""

import json

import pytest
from helpers.corpus import error_lines, hvdllm, make_dataset, read_metrics, train_args
from helpers.mounts import remount_read_only, tmpfs


def write_metrics(run_dir, *lines: str):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    return run_dir


def record(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss, "tokens_per_s": 1000.0}) + "\n"


def test_report_tolerates_a_torn_last_line(tmp_path):
    run = write_metrics(tmp_path / "run", record(1, 5.0), record(2, 4.0), '{"step": 3, "lo')
    result = hvdllm("report", str(run))
    assert result.returncode == 0, result.stderr
    assert "steps        1 .. 2" in result.stdout and "5.0000 -> 4.0000" in result.stdout
    assert f"warning: {run / 'metrics.jsonl'}:3: torn last line" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad, message", [
    ('{"step": 2, "lo\n', ":2: not a JSON line"),
    ('[1, 2]\n', ':2: not a metrics record (a JSON object with an integer "step")'),
    ('{"step": 2, "loss": "high"}\n', ":2: 'loss' must be a number or null, got 'high'"),
])
def test_report_names_file_and_line_of_a_bad_record(tmp_path, bad, message):
    run = write_metrics(tmp_path / "run", record(1, 5.0), bad, record(3, 3.0))
    result = hvdllm("report", str(run))
    assert result.returncode == 2
    assert error_lines(result) == [f"error: {run / 'metrics.jsonl'}{message}"], result.stderr
    assert result.stdout == ""  # errors go to stderr


def test_report_in_a_read_only_run_folder(tmp_path):
    with tmpfs(tmp_path / "run", size_kb=256) as run:
        write_metrics(run, record(1, 5.0), record(2, 4.0))
        remount_read_only(run)
        result = hvdllm("report", str(run))
    assert result.returncode == 0, result.stderr
    assert "5.0000 -> 4.0000" in result.stdout
    assert f"warning: {run / 'training.png'}: plot not written: Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_on_a_file_says_what_it_is(tmp_path):
    (tmp_path / "notes").write_text("x")
    result = hvdllm("report", str(tmp_path / "notes"))
    assert result.returncode == 2
    assert error_lines(result) == [f"error: run folder {tmp_path / 'notes'} is a file, not a folder"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with a checkpoint at steps 2 and 4 (and an evaluation at each)."""
    root = tmp_path_factory.mktemp("run")
    data = make_dataset(root / "ds")
    run = root / "run"
    result = hvdllm(*train_args(data, run, "--train.steps=4", "--checkpoint.every=2", "--train.eval_every=2"))
    assert result.returncode == 0, result.stderr
    return data, run


def test_generate_from_a_run_folder_uses_its_best_checkpoint(trained):
    _, run = trained
    best_step = min((r for r in read_metrics(run) if r.get("val_loss") is not None),
                    key=lambda r: r["val_loss"])["step"]
    result = hvdllm("generate", "--checkpoint", str(run), "--max-new-tokens", "10", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert f"loaded {run / 'checkpoints' / 'best.pt'} (step {best_step})" in result.stderr
    assert "<|endoftext|>" not in result.stdout[:13]  # no literal start-of-document marker
    assert len(result.stdout.rstrip("\n")) <= 10


def test_generate_from_a_run_folder_without_best_uses_the_newest(trained, tmp_path):
    _, run = trained
    folder = tmp_path / "copy" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("step-00000002.pt", "step-00000004.pt"):
        (folder / name).write_bytes((run / "checkpoints" / name).read_bytes())
        sidecar = run / "checkpoints" / f"{name}.sha256"
        if sidecar.exists():
            (folder / sidecar.name).write_bytes(sidecar.read_bytes())
    result = hvdllm("generate", "--checkpoint", str(tmp_path / "copy"), "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert f"loaded {folder / 'step-00000004.pt'} (step 4)" in result.stderr


@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda': torch sees no CUDA device"),
    ("tpu9", "unknown device 'tpu9'"),
])
def test_generate_on_a_missing_or_bogus_device_is_one_line(trained, device, message):
    _, run = trained
    result = hvdllm("generate", "--checkpoint", str(run), "--device", device)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and message in error_lines(result)[0], result.stderr
    assert "Traceback" not in result.stderr


def test_resume_tolerates_a_torn_last_metrics_line(trained, tmp_path):
    data, run = trained
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoints").mkdir()
    for path in (run / "checkpoints").iterdir():
        (copy / "checkpoints" / path.name).write_bytes(path.read_bytes())
    (copy / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 5, "loss": 3.')
    result = hvdllm(*train_args(data, copy, "--train.steps=6", "--checkpoint.every=2", "--train.eval_every=2",
                                "--checkpoint.resume=auto"))
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(copy)] == [1, 2, 3, 4, 5, 6]
