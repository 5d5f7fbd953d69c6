"""Which checkpoint a resume takes: one is sound only when every file of it (every pipeline
stage, local-SGD rank and parameter-server shard its layout records) is there with its
checksum and matches it; ``resume=auto`` falls back past any other to the newest sound one."""

import pytest
import torch

from hvdllm.errors import UserError
from hvdllm.train.checkpoint import checkpoint_dir, checkpoint_weights, checksum_path, resolve_resume, write_checkpoint

PIPELINE = {"data": 1, "pipeline": 2, "tensor": 1, "servers": 0}
LOCAL_SGD = {"data": 2, "pipeline": 1, "tensor": 1, "servers": 0, "replicas_differ": True}
ASYNC = {"data": 2, "pipeline": 1, "tensor": 1, "servers": 1}


def write_steps(run_dir, layout: dict, shards: list[int], steps=(2, 4)) -> None:
    """A checkpoint of ``layout`` at each step: one file per shard, as the ranks write them."""
    for step in steps:
        for shard in shards:
            state = {"model": {f"w{shard}": torch.full((2,), float(step))}, "optimizer": {}, "step": step,
                     "config_toml": "", "model_config": {}, "layout": layout}
            write_checkpoint(state, run_dir, step, shard)


def corrupt(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def step_file(run_dir, step: int, shard: int = 0):
    name = f"step-{step:08d}.pt" if shard == 0 else f"step-{step:08d}.stage-{shard}.pt"
    return checkpoint_dir(run_dir) / name


@pytest.mark.parametrize("layout, shards, spoil, broken_shard", [
    (PIPELINE, [0, 1], "drop its checksum", 1),
    (ASYNC, [0, 1000], "corrupt", 1000),  # a parameter server's shard
    (LOCAL_SGD, [0, 1], "remove", 1),  # a local-SGD rank's shard
    (ASYNC, [0, 1000], "remove", 1000),
])
def test_auto_falls_back_past_an_unsound_shard_of_any_kind(tmp_path, capfd, layout, shards, spoil, broken_shard):
    write_steps(tmp_path, layout, shards)
    broken = step_file(tmp_path, 4, broken_shard)
    {"drop its checksum": lambda: checksum_path(broken).unlink(), "corrupt": lambda: corrupt(broken),
     "remove": broken.unlink}[spoil]()
    path, state = resolve_resume("auto", tmp_path)
    assert path == step_file(tmp_path, 2) and state["step"] == 2
    assert f"warning: skipping {broken}: " in capfd.readouterr().err
    with pytest.raises(UserError, match=f"^{broken}: "):  # named explicitly, it is refused in one line
        resolve_resume(str(step_file(tmp_path, 4)), tmp_path)


def test_a_shard_without_its_checksum_is_not_exported(tmp_path):
    write_steps(tmp_path, PIPELINE, [0, 1], steps=(4,))
    checksum_path(step_file(tmp_path, 4, 1)).unlink()
    with pytest.raises(UserError, match=f"^{step_file(tmp_path, 4, 1)}: checkpoint shard has no .*sha256"):
        checkpoint_weights(step_file(tmp_path, 4))
