"""A checkpoint resumes on another cut of the model (pipeline stages, tensor ranks, both, or one
piece): its shards are put together and re-sliced, optimizer state included, and the resumed
run gives the uninterrupted run's losses (fp32, dropout 0, fixed seed, the same global batch)."""

import shutil

import pytest
from helpers.corpus import error_lines, hvdllm, hvdllm_mpi, read_metrics, train_args

COMMON = ("--train.steps=12", "--checkpoint.every=6", "--data.global_batch_size=8", "--optim.grad_clip=0.5",
          "--model.vocab_size=264")
LAYOUTS = {
    "one piece": (1, ()),
    "pipeline 2": (2, ("--parallel.pipeline=2", "--parallel.micro_batches=2")),
    "tensor 2": (2, ("--parallel.tensor=2",)),
    "tensor 2 x pipeline 2": (4, ("--parallel.tensor=2", "--parallel.pipeline=2", "--parallel.micro_batches=2")),
}


def run(layout, data, run_dir, *overrides):
    np, flags = LAYOUTS[layout]
    args = train_args(data, run_dir, *COMMON, *flags, *overrides)
    result = hvdllm(*args) if np == 1 else hvdllm_mpi(np, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def resume_from_step_6(straight, resumed):
    (resumed / "checkpoints").mkdir(parents=True)
    for path in (straight / "checkpoints").glob("step-00000006*"):
        shutil.copy(path, resumed / "checkpoints")


@pytest.mark.parametrize("optimizer, tied, source, target", [
    # Adafactor's row and column factors: cut along the split dimension, or whole where reduced.
    ("adafactor", "true", "tensor 2", "pipeline 2"),
    ("adafactor", "false", "pipeline 2", "tensor 2"),
    ("lamb", "true", "tensor 2 x pipeline 2", "one piece"),
])
def test_a_checkpoint_resumes_on_another_cut_with_the_losses_of_the_uninterrupted_run(
        data, tmp_path, optimizer, tied, source, target):
    overrides = (f"--optim.name={optimizer}", f"--model.tie_weights={tied}")
    straight = tmp_path / "straight"
    run(source, data, straight, *overrides)
    resumed = tmp_path / "resumed"
    resume_from_step_6(straight, resumed)
    result = run(target, data, resumed, *overrides, "--checkpoint.resume=auto")
    line = next(line for line in result.stdout.splitlines() if "resuming from" in line)
    assert "at step 6 (layout data 1, " in line and " -> data 1, " in line, line
    expected = [r["loss"] for r in read_metrics(straight)][6:]
    after = read_metrics(resumed)
    assert [r["step"] for r in after] == list(range(7, 13))
    worst = max(abs(a["loss"] - b) / b for a, b in zip(after, expected))
    assert worst < 1e-6, worst  # without the optimizer state re-sliced: 1e-5 and more


def test_local_sgd_replicas_on_another_cut_are_one_line(data, tmp_path):
    straight = tmp_path / "straight"
    args = train_args(data, straight, "--train.steps=2", "--parallel.strategy=local-sgd", "--parallel.data=2")
    assert hvdllm_mpi(2, *args).returncode == 0
    other = hvdllm_mpi(2, *train_args(data, straight, "--train.steps=4", "--checkpoint.resume=auto",
                                      "--parallel.strategy=local-sgd", "--parallel.pipeline=2"), timeout=120)
    assert other.returncode != 0 and error_lines(other) == [
        f"error: {straight / 'checkpoints' / 'step-00000002.pt'}: checkpoint was cut into one piece, this run into "
        "2 pipeline stages, and its local-SGD replicas differ, one file per rank: resume it with "
        "parallel.pipeline=1, parallel.tensor=1 (on a multiple of 1 ranks)"] * 2


def test_the_same_stages_cut_at_other_blocks_resume_and_an_older_checkpoint_says_what_resumes_it(data, tmp_path):
    import torch

    run_dir = tmp_path / "run"
    model = ("--model.n_layer=3", "--parallel.pipeline=2")
    assert hvdllm_mpi(2, *train_args(data, run_dir, *model, "--parallel.stage_layers=[1, 2]", "--train.steps=2",
                                     "--checkpoint.every=2")).returncode == 0
    other_cut = train_args(data, run_dir, *model, "--parallel.stage_layers=[2, 1]", "--train.steps=4",
                           "--checkpoint.every=4", "--checkpoint.resume=auto")
    resumed = hvdllm_mpi(2, *other_cut)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("(layout data 1, 2 pipeline stages of [1, 2] blocks -> data 1, 2 pipeline stages of [2, 1] blocks)"
            in resumed.stdout)
    # Written before shards named their optimizer's parameters: only its own cut can take it.
    first = run_dir / "checkpoints" / "step-00000004.pt"
    for path in (first, run_dir / "checkpoints" / "step-00000004.stage-1.pt"):
        state = torch.load(path, weights_only=True)
        del state["layout"]["named_optimizer"], state["optimizer_names"]
        torch.save(state, path)
        path.with_name(path.name + ".sha256").unlink()
    back = hvdllm_mpi(2, *train_args(data, run_dir, *model, "--parallel.stage_layers=[1, 2]", "--train.steps=6",
                                     "--checkpoint.resume=auto"), timeout=120)
    assert back.returncode != 0 and error_lines(back) == [
        f"error: {first}: checkpoint was cut into 2 pipeline stages of [2, 1] blocks, this run into 2 pipeline "
        "stages of [1, 2] blocks, and it predates re-slicing: resume it with parallel.pipeline=2, "
        "parallel.stage_layers=[2, 1], parallel.tensor=1 (on a multiple of 2 ranks)"] * 2
