"""What `--checkpoint.resume` accepts and refuses: flipped bytes, another tokenizer, another
number of data-parallel ranks, no checkpoint at all; and what a run says as it goes."""

import json
import os
import zipfile

import torch
from helpers.corpus import error_lines, hvdllm, hvdllm_mpi, make_corpus, read_metrics, train_args

from hvdllm.data import ShardedSamples


def _poison_largest_tensor(path):
    """Overwrite the first value of the checkpoint's largest tensor with 1e24, as flipped
    bits on a disk would, leaving the zip structure intact (it still loads)."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(member.header_offset)
        header = f.read(30)  # the local file header: its name and extra field lengths are at 26
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        f.seek(member.header_offset + 30 + name_len + extra_len)
        f.write(torch.tensor([1e24], dtype=torch.float32).numpy().tobytes())


def test_flipped_bytes_are_caught_and_auto_falls_back(data, tmp_path):
    run = tmp_path / "run"
    assert hvdllm(*train_args(data, run, "--train.steps=4", "--checkpoint.every=2")).returncode == 0
    newest = run / "checkpoints" / "step-00000004.pt"
    _poison_largest_tensor(newest)
    resumed = hvdllm(*train_args(data, run, "--train.steps=6", "--checkpoint.every=2", "--checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: skipping {newest}: corrupt checkpoint (sha256" in resumed.stderr
    assert f"resuming from {run / 'checkpoints' / 'step-00000002.pt'} at step 2" in resumed.stdout
    assert max(abs(r["loss"]) for r in read_metrics(run)) < 10  # no 1e24 weights behind it
    _poison_largest_tensor(run / "checkpoints" / "step-00000006.pt")
    explicit = hvdllm(*train_args(data, tmp_path / "other", "--train.steps=8",
                                  f"--checkpoint.resume={run / 'checkpoints' / 'step-00000006.pt'}"))
    assert explicit.returncode == 2
    assert "corrupt checkpoint (sha256" in error_lines(explicit)[0]


def test_another_tokenizer_of_the_same_size_is_refused(data, tmp_path):
    run = tmp_path / "run"
    assert hvdllm(*train_args(data, run, "--train.steps=2")).returncode == 0
    # The same byte tokenizer with two ids swapped: same vocabulary size, other meaning.
    tok = json.loads((data / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[40], sorted(vocab)[41]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(tok))
    other = tmp_path / "other-data"
    made = hvdllm("prepare", str(data.parent / "corpus"), "--out", str(other), "--tokenizer",
                  str(tmp_path / "swapped.json"), "--seq-len", "32", "--val-fraction", "0.15", "--min-chars", "16")
    assert made.returncode == 0, made.stderr
    assert json.loads((other / "manifest.json").read_text())["vocab_size"] == \
        json.loads((data / "manifest.json").read_text())["vocab_size"]
    resumed = hvdllm(*train_args(data, run, "--train.steps=4", "--checkpoint.resume=auto", f"--data.path={other}"))
    assert resumed.returncode == 2
    (line,) = error_lines(resumed)
    old_sha = json.loads((data / "manifest.json").read_text())["tokenizer"]["sha256"]
    new_sha = json.loads((other / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert f"tokenizer sha256 {old_sha[:16]}" in line and f"tokenizer sha256 {new_sha[:16]}" in line


def test_another_number_of_data_ranks_continues_at_the_same_sample(data, tmp_path):
    run = tmp_path / "run"
    two = hvdllm_mpi(2, *train_args(data, run, "--train.steps=3", "--checkpoint.every=3", "--data.batch_size=4"))
    assert two.returncode == 0, two.stderr
    # 3 steps of 2 ranks x 4 samples: the next sample is 24, batch 6 for 1 rank x 4.
    one = hvdllm(*train_args(data, run, "--train.steps=4", "--checkpoint.every=4", "--data.batch_size=4",
                             "--checkpoint.resume=auto"))
    assert one.returncode == 0, one.stderr
    state = torch.load(run / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert state["phase"]["data"] == {"epoch": 0, "batch": 7, "global_batch": 4}
    # 24 samples read is not a whole number of batches of 16: refused, not guessed.
    refused = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=6", "--data.batch_size=16",
                                 f"--checkpoint.resume={run / 'checkpoints' / 'step-00000003.pt'}"))
    assert refused.returncode == 2
    (line,) = error_lines(refused)
    assert "stopped at sample 24 of epoch 0" in line and "global batch 16" in line


def test_local_sgd_missing_rank_shard_falls_back_and_more_ranks_are_told_the_layout(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run, "--parallel.strategy=local-sgd", "--checkpoint.every=2")
    assert hvdllm_mpi(2, *args, "--train.steps=4").returncode == 0
    (run / "checkpoints" / "step-00000004.stage-1.pt").unlink()  # rank 1's file of step 4
    three = hvdllm_mpi(3, *args, "--train.steps=6", "--checkpoint.resume=auto", timeout=120)
    lines = error_lines(three)
    assert three.returncode != 0 and len(lines) == 3 and len(set(lines)) == 1, three.stderr  # every rank
    assert "2 ranks saved it, 3 launched; resume it on 2 ranks" in lines[0] and "does not exist" not in lines[0]
    two = hvdllm_mpi(2, *args, "--train.steps=6", "--checkpoint.resume=auto", timeout=120)
    assert two.returncode == 0, two.stderr
    assert f"resuming from {run / 'checkpoints' / 'step-00000002.pt'} at step 2" in two.stdout


def test_a_corrupt_parameter_server_shard_falls_back(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run, "--parallel.strategy=async", "--parallel.servers=1", "--checkpoint.every=2")
    assert hvdllm_mpi(2, *args, "--train.steps=4").returncode == 0
    _poison_largest_tensor(run / "checkpoints" / "step-00000004.stage-1000.pt")
    resumed = hvdllm_mpi(2, *args, "--train.steps=6", "--checkpoint.resume=auto", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run / 'checkpoints' / 'step-00000002.pt'} at step 2" in resumed.stdout


def test_an_older_pipeline_checkpoint_on_one_rank_says_what_resumes_it(data, tmp_path):
    """Before re-slicing, shards did not name their optimizer's parameters: such a checkpoint
    resumes only on the cut it was made for."""
    run = tmp_path / "run"
    assert hvdllm_mpi(2, *train_args(data, run, "--parallel.pipeline=2", "--train.steps=2")).returncode == 0
    first = run / "checkpoints" / "step-00000002.pt"
    state = torch.load(first, weights_only=True)
    del state["layout"]["named_optimizer"], state["optimizer_names"]
    torch.save(state, first)
    (run / "checkpoints" / "step-00000002.pt.sha256").unlink()
    one = hvdllm(*train_args(data, run, "--train.steps=4", "--checkpoint.resume=auto"))
    (line,) = error_lines(one)
    assert one.returncode == 2 and "None" not in line
    assert ("checkpoint was cut into 2 pipeline stages of [1, 1] blocks, this run into one piece, and it predates "
            "re-slicing: resume it with parallel.pipeline=2, parallel.stage_layers=[1, 1], parallel.tensor=1 (on a "
            "multiple of 2 ranks)") in line


def test_resume_auto_says_what_it_did(data, tmp_path):
    fresh = hvdllm(*train_args(data, tmp_path / "fresh", "--train.steps=2", "--checkpoint.resume=auto"))
    assert fresh.returncode == 0, fresh.stderr
    assert "note: checkpoint.resume=auto: no checkpoint in" in fresh.stdout and "fresh run" in fresh.stdout
    checkpoint = tmp_path / "fresh" / "checkpoints" / "step-00000002.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # every checkpoint of the run is corrupt
    again = hvdllm(*train_args(data, tmp_path / "fresh", "--train.steps=4", "--checkpoint.resume=auto"))
    assert again.returncode == 2
    (line,) = error_lines(again)
    assert "no sound checkpoint in" in line and "--checkpoint.resume=auto" not in line


def test_a_dataset_without_a_val_split_says_evaluation_and_early_stopping_are_off(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, files=4, docs_per_jsonl=10)
    assert hvdllm("prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", "byte", "--seq-len", "32",
                  "--val-fraction", "0", "--min-chars", "16").returncode == 0
    run = hvdllm(*train_args(tmp_path / "data", tmp_path / "run", "--train.steps=2",
                             "--train.early_stop_patience=2"))
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("eval ")]
    assert "off: " in line and "has no val split" in line and "early stopping" in line and "--val-fraction" in line


def test_a_resume_says_each_changed_setting_and_what_the_lr_curve_does(data, tmp_path):
    """Resuming with more train.steps recomputes the cosine schedule: the resume says so, with
    the lr the old settings had at the next step and the one the new ones give (both as the
    runs logged them), and the elapsed time goes on from the checkpoint's run."""
    first = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=8", "--checkpoint.every=4", "--log.every=1"))
    assert first.returncode == 0, first.stderr
    old = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004.pt"
    resumed = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=12", "--log.every=1",
                                 f"--checkpoint.resume={checkpoint}"))  # the same run: its log goes on
    assert resumed.returncode == 0, resumed.stderr
    new = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    lines = [line for line in resumed.stdout.splitlines() if line.startswith("resume: ")]
    assert "resume: train.steps 8 -> 12 (checkpoint -> now)" in lines, resumed.stdout
    assert "resume: checkpoint.every 4 -> 10 (checkpoint -> now)" in lines  # every changed setting, one line each
    assert not any("checkpoint.resume" in line for line in lines)
    (schedule,) = [line for line in lines if "lr schedule" in line]
    assert (f"lr at step 5 was {old[5]['lr']:.2e} under the checkpoint's settings, is {new[5]['lr']:.2e} now, "
            f"then cosine to {new[12]['lr']:.2e} at step 12") in schedule, schedule
    assert f"{old[5]['lr']:.2e}" != f"{new[5]['lr']:.2e}"  # the jump the user is told about
    assert new[5]["elapsed_s"] > old[4]["elapsed_s"]  # the clock goes on


def test_start_banner_step_lines_and_peak_source(data, tmp_path):
    cache = tmp_path / "cache"
    run = hvdllm(*train_args(data, tmp_path / "run", "--train.steps=4", "--checkpoint.every=2"),
                 env=dict(os.environ, XDG_CACHE_HOME=str(cache)))
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    for start in ("model        gpt-nano: ", "world        1 rank(s): data 1 x pipeline 1",
                  "batch        4 samples x 32 tokens = 128 tokens per step", "device       cpu (1 threads), "
                  "precision fp32", "mfu peak     "):
        assert any(line.startswith(start) for line in out), (start, run.stdout)
    assert f"measured: fp32 matmul probe, cached in {cache / 'hvdllm' / 'peak_flops.json'}" in run.stdout
    steps = [line for line in out if line.startswith("step ")]
    assert len(steps) == 4 and all(" ms/step | elapsed 0:00:" in line and "| eta 0:00:" in line for line in steps)
    # The run's reach in epochs, and the epoch each step line has come to (4 samples a step).
    samples = len(ShardedSamples(data, "train"))
    assert f"data         {samples:,} train samples; the run reads 16 = {16 / samples:.3g} epochs" in out
    assert steps[-1].split(" | epoch ")[1].startswith(f"{16 / samples:.2f} |"), steps[-1]
    assert any(line.startswith("eval         every ") and " val samples" in line for line in out), run.stdout
    assert f"checkpoint: step 2 saved to {tmp_path / 'run' / 'checkpoints' / 'step-00000002.pt'}" in run.stdout
    given = hvdllm(*train_args(data, tmp_path / "given", "--train.steps=2", "--train.peak_flops=2e11"))
    assert "mfu peak     0.200 TFLOP/s per rank (train.peak_flops)" in given.stdout
    report = hvdllm("report", str(tmp_path / "given"))
    assert "of 0.200 TFLOP/s per rank (train.peak_flops)" in report.stdout, report.stdout
