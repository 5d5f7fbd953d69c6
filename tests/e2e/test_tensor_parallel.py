"""Tensor parallelism through the CLI: t ranks splitting every layer, alone and with data and
pipeline parallelism, give the losses of one plain rank on the same data (fp32, dropout 0,
fixed seed, the same global batch)."""

import pytest
from helpers.corpus import assert_same_losses, error_lines, hvdllm, hvdllm_mpi, read_metrics, train_args

# The byte-level test data has 259 tokens: a model vocabulary of 264 splits over 2, 4 and 8 ranks.
VOCAB = "--model.vocab_size=264"
STEPS = 12


def run(np, data, run_dir, *overrides):
    args = train_args(data, run_dir, "--checkpoint.every=0", VOCAB, f"--train.steps={STEPS}", *overrides)
    result = hvdllm(*args) if np == 1 else hvdllm_mpi(np, *args)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    return run(1, data, tmp_path_factory.mktemp("one") / "run")


@pytest.mark.parametrize("tied, sequence", [("true", "false"), ("false", "false"), ("true", "true"),
                                            ("false", "true")])
def test_two_tensor_ranks_give_the_losses_of_one_rank(data, tmp_path, tied, sequence):
    reference = run(1, data, tmp_path / "one", f"--model.tie_weights={tied}")
    split = run(2, data, tmp_path / "split", "--parallel.tensor=2", f"--model.tie_weights={tied}",
                f"--parallel.sequence_parallel={sequence}")
    assert_same_losses(reference, split, STEPS)
    val = [[r["val_loss"] for r in read_metrics(d) if "val_loss" in r] for d in (reference, split)]
    assert val[0] and abs(val[0][-1] - val[1][-1]) / val[0][-1] < 1e-5  # evaluated on split logits


def test_the_mpi4py_tensor_backend_gives_the_same_losses(data, one_rank, tmp_path):
    split = run(2, data, tmp_path / "split", "--parallel.tensor=2", "--parallel.tensor_backend=mpi4py")
    assert_same_losses(one_rank, split, STEPS)


def test_split_layers_accumulate_and_checkpoint_activations(data, tmp_path):
    both = ["--parallel.accum_steps=2", "--model.checkpoint_every=1"]
    reference = run(1, data, tmp_path / "one", *both)
    split = run(2, data, tmp_path / "split", "--parallel.tensor=2", "--parallel.sequence_parallel=true", *both)
    assert_same_losses(reference, split, STEPS)


# bf16 autocast rounds each matmul's inputs: split matmuls round otherwise than whole ones.
BF16_RELATIVE_TOLERANCE = 1e-2


def test_bf16_split_layers_give_the_losses_of_one_bf16_rank(data, tmp_path):
    reference = run(1, data, tmp_path / "one", "--train.precision=bf16")
    split = run(2, data, tmp_path / "split", "--parallel.tensor=2", "--train.precision=bf16")
    assert_same_losses(reference, split, STEPS, rel=BF16_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("optimizer, sequence", [("lamb", "false"), ("adafactor", "true")])
def test_optimizers_take_statistics_of_whole_tensors(data, tmp_path, optimizer, sequence):
    """LAMB's trust ratios and Adafactor's factored moments and RMS, reduced over the tensor group."""
    reference = run(1, data, tmp_path / "one", f"--optim.name={optimizer}")
    split = run(2, data, tmp_path / "split", "--parallel.tensor=2", f"--optim.name={optimizer}",
                f"--parallel.sequence_parallel={sequence}")
    assert_same_losses(reference, split, STEPS)


def test_tensor_by_data_on_four_ranks_gives_the_losses_of_one_rank(data, tmp_path):
    # Adafactor: its group statistics must survive Horovod's DistributedOptimizer, which rebuilds it.
    reference = run(1, data, tmp_path / "one", "--data.batch_size=8", "--optim.name=adafactor")
    split = run(4, data, tmp_path / "split", "--parallel.tensor=2", "--parallel.data=2", "--optim.name=adafactor")
    assert_same_losses(reference, split, STEPS)


@pytest.mark.parametrize("sequence", ["false", "true"])
def test_tensor_by_pipeline_on_four_ranks_gives_the_losses_of_one_rank(data, one_rank, tmp_path, sequence):
    split = run(4, data, tmp_path / "split", "--parallel.tensor=2", "--parallel.pipeline=2",
                "--parallel.micro_batches=2", f"--parallel.sequence_parallel={sequence}")
    assert_same_losses(one_rank, split, STEPS)


def test_a_vocabulary_that_does_not_split_is_one_line_on_every_rank(data, tmp_path):
    result = hvdllm_mpi(2, *train_args(data, tmp_path / "run", "--parallel.tensor=2", "--model.vocab_size=261"))
    assert result.returncode != 0
    assert error_lines(result) == ["error: model.vocab_size=261 does not divide over parallel.tensor=2 ranks: set "
                                   "model.vocab_size to a multiple of 2 (e.g. 262)"] * 2


def test_tensor_shards_checkpoint_resume_exactly_and_generate_consolidates(data, tmp_path):
    straight = run(2, data, tmp_path / "straight", "--parallel.tensor=2", "--checkpoint.every=4")
    folder = straight / "checkpoints"
    assert (folder / "step-00000008.pt").is_file() and (folder / "step-00000008.stage-1.pt").is_file()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for path in folder.glob("step-00000008*"):
        (resumed / "checkpoints" / path.name).write_bytes(path.read_bytes())
    run(2, data, resumed, "--parallel.tensor=2", "--checkpoint.every=4", "--checkpoint.resume=auto")
    expected = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed)] == [(s, expected[s]) for s in range(9, 13)]
    # The shards put back together are the 1-rank model: the same greedy text.
    whole = run(1, data, tmp_path / "whole", "--checkpoint.every=4")
    texts = [hvdllm("generate", "--checkpoint", str(d), "--max-new-tokens", "12", "--temperature", "0",
                    "--prompt", "def ") for d in (whole, straight)]
    assert all(t.returncode == 0 for t in texts), texts[1].stderr
    assert texts[0].stdout == texts[1].stdout and "step 12" in texts[1].stderr
    exported = hvdllm("export", "--checkpoint", str(straight), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights["transformer.wte.weight"].shape[0] == 264  # the vocabulary's two halves, put back
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    # Another layout takes these shards, re-sliced (tests/e2e/test_reshard.py checks its losses).
    other = hvdllm_mpi(2, *train_args(data, straight, VOCAB, "--train.steps=14", "--checkpoint.resume=auto"),
                       timeout=120)
    assert other.returncode == 0, other.stderr
    assert "at step 12 (layout data 1, 1 pipeline stage x 2 tensor ranks -> data 2, one piece)" in other.stdout


def test_tensor_by_pipeline_by_data_on_eight_ranks_gives_the_losses_of_one_rank(data, tmp_path):
    """The shape of the layout hvdllm plan proposes for GPT-3 175B (t x p x d), tiny."""
    reference = run(1, data, tmp_path / "one", "--data.batch_size=8")
    split = run(8, data, tmp_path / "split", "--parallel.tensor=2", "--parallel.pipeline=2", "--parallel.data=2",
                "--parallel.micro_batches=2", "--parallel.sequence_parallel=true")
    assert_same_losses(reference, split, STEPS)
