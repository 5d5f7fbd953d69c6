"""``train.compile``: the blocks run compiled (Inductor) with the losses of eager mode, on one
rank, with activation checkpointing, and cut into two pipeline stages on two ranks. Inductor's
cache is kept in the test's folder, so it starts cold (its kernels there show that compiling
happened) and nothing is left in /tmp."""

import os

import pytest
from helpers.corpus import hvdllm, hvdllm_mpi, read_metrics, train_args

LAYOUTS = {"one-rank": (1, []), "checkpointing": (1, ["--model.checkpoint_every=1"]),
           "pipeline": (2, ["--parallel.pipeline=2", "--parallel.micro_batches=2"])}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_blocks_give_eager_losses(data, tmp_path, layout):
    np, settings = LAYOUTS[layout]
    scratch = tmp_path / "tmp"  # where Inductor keeps its cache (and, by TMPDIR, its headers)
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"))
    runs, banner = {}, ""
    for name, extra in (("eager", []), ("compiled", ["--train.compile=true"])):
        args = train_args(data, tmp_path / name, "--train.steps=3", "--checkpoint.every=0", *settings, *extra)
        result = hvdllm(*args, timeout=600, env=env) if np == 1 else hvdllm_mpi(np, *args, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name)
        banner = result.stdout
    eager, compiled = ([r["loss"] for r in runs[name]] for name in ("eager", "compiled"))
    assert len(eager) == 3 and max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5
    # Inductor really compiled: its generated kernels are in the (test's own) cache.
    assert list(scratch.glob("inductor/**/*.so")) and list(scratch.glob("inductor/**/*.py"))
    assert "blocks compiled (torch.compile)" in banner
