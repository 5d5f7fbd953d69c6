"""``train.compile``: the blocks run compiled (Inductor) with the losses of eager mode.
Inductor's cache is kept in the test's folder, so it starts cold (its kernels there show that
compiling happened) and nothing is left in /tmp."""

import os

from helpers.corpus import hvdllm, make_dataset, read_metrics, train_args


def test_compiled_blocks_give_eager_losses(tmp_path):
    data = make_dataset(tmp_path / "ds")
    scratch = tmp_path / "tmp"  # where Inductor keeps its cache (and, by TMPDIR, its headers)
    scratch.mkdir()
    runs, banner = {}, ""
    for name, extra in (("eager", []), ("compiled", ["--train.compile=true"])):
        result = hvdllm(*train_args(data, tmp_path / name, "--train.steps=4", "--checkpoint.every=0", *extra),
                        timeout=600, env=dict(os.environ, TMPDIR=str(scratch),
                                              TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor")))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name)
        banner = result.stdout
    eager, compiled = ([r["loss"] for r in runs[name]] for name in ("eager", "compiled"))
    assert len(eager) == 4 and max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5
    # Inductor really compiled: its generated kernels are in the (test's own) cache.
    assert list(scratch.glob("inductor/**/*.so")) and list(scratch.glob("inductor/**/*.py"))
    assert "blocks compiled (torch.compile)" in banner
