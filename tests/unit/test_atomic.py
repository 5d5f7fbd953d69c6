import errno
import os

import pytest
import torch

from hvdllm import atomic
from hvdllm.atomic import atomic_path, atomic_write, write_json_atomic
from hvdllm.train.checkpoint import save_checkpoint
from hvdllm.train.report import plot_run


def test_target_appears_only_complete(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # a reader meanwhile sees the whole old file
        f.write(b"content")
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("helper", [atomic_write, atomic_path])
def test_exception_inside_leaves_old_file_and_no_temp(tmp_path, helper):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyError), helper(target) as handle:
        if helper is atomic_path:
            handle.write_bytes(b"half")
        else:
            handle.write(b"half")
        raise KeyError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_full_disk_at_fsync_leaves_no_temp(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    target = tmp_path / "manifest.json"
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(target, {"a": 1})
    with pytest.raises(OSError, match="No space"), atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert os.listdir(tmp_path) == []


def test_path_variant_replaces_stale_temp_of_same_pid(tmp_path):
    target = tmp_path / "best.pt"
    stale = tmp_path / f".best.pt.tmp-{os.getpid()}"  # left by a killed writer
    stale.write_bytes(b"stale")
    source = tmp_path / "step.pt"
    source.write_bytes(b"step")
    with atomic_path(target) as link:
        os.link(source, link)
    assert target.read_bytes() == b"step" and sorted(os.listdir(tmp_path)) == ["best.pt", "step.pt"]


def test_append_mode_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "x", "a"):
        pass


def test_checkpoint_and_best_link_written_whole(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2, is_best=step == 2)
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["best.pt", "best.pt.sha256", "step-00000002.pt", "step-00000002.pt.sha256",
                                          "step-00000003.pt", "step-00000003.pt.sha256"]
    assert torch.load(folder / "best.pt", weights_only=True) == {"step": 2}


def test_plot_is_a_png_under_its_own_name(tmp_path):
    records = [{"step": s, "loss": 3.0 - s / 10, "tokens_per_s": 100.0} for s in range(5)]
    path = plot_run(records, tmp_path / "training.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["training.png"]
