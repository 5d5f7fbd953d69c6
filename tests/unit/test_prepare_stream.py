"""hvdllm prepare at corpus scale: shards that do not depend on the number of ranks, and a
prepare killed part way that a rerun finishes with byte-identical output."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers.corpus import clean_env, hvdllm, hvdllm_mpi, random_text, rank_pids

from hvdllm.comm.launch import mpirun_command
from hvdllm.data import ShardedSamples
from hvdllm.data.shards import verify_folder


def make_corpus_with_duplicates(folder, files=24, seed=5):
    """Text files of distinct documents, exact copies and near copies (a few words changed)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    originals = []
    for i in range(files):
        roll = rng.random()
        if originals and roll < 0.15:
            text = rng.choice(originals).upper()  # an exact duplicate once normalized
        elif originals and roll < 0.35:
            words = rng.choice(originals).split()
            for _ in range(max(1, len(words) // 40)):
                words[rng.randrange(len(words))] = "changed"
            text = " ".join(words)
        else:
            text = random_text(rng, 150 + 10 * (i % 7))
            originals.append(text)
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


def prepare_args(corpus, out, *extra):
    return ["prepare", str(corpus), "--out", str(out), "--seq-len", "16", "--vocab-size", "300",
            "--val-fraction", "0.2", "--samples-per-shard", "7", "--chunk-mb", "0.002", *extra]


def dataset_bytes(folder):
    """Every file of a dataset by name, the manifest without how the run went (its timing)."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("timing")
    return files, manifest


def test_one_two_and_three_ranks_write_the_same_shards(tmp_path):
    corpus = make_corpus_with_duplicates(tmp_path / "corpus")
    one = hvdllm(*prepare_args(corpus, tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    reference = dataset_bytes(tmp_path / "one")
    stats = reference[1]["stats"]
    assert stats["exact_duplicates"] > 0 and stats["near_duplicates"] > 0
    assert len(reference[1]["shards"]) > 3  # shards cross the ranks' boundaries
    for ranks in (2, 3):
        run = hvdllm_mpi(ranks, *prepare_args(corpus, tmp_path / f"n{ranks}"))
        assert run.returncode == 0, run.stderr
        assert dataset_bytes(tmp_path / f"n{ranks}") == reference, ranks


def _kill_job(proc):
    for pid in rank_pids(proc):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(timeout=30)


def _wait_for_markers(build_root, count, proc, timeout=120):
    """Until ``count`` chunk markers exist in the build folder (or the run ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(build_root.glob(".building-*/.work/*.done.json"))) >= count:
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_prepare_killed_part_way_finishes_byte_identical_when_run_again(tmp_path, ranks):
    corpus = make_corpus_with_duplicates(tmp_path / "corpus", files=40)
    whole = hvdllm(*prepare_args(corpus, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hvdllm", *prepare_args(corpus, out)]
    if ranks > 1:
        command = mpirun_command(ranks, command[1:])
    # 40 files of ~1 kB in 2 kB chunks: ~20 scan and ~20 tokenize markers; kill after a random number.
    after = random.Random(ranks).randrange(1, 30)
    proc = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for_markers(out, after, proc), "the run ended before the kill"
        time.sleep(random.Random(after).random() * 0.05)
    finally:
        _kill_job(proc)
    assert list(out.glob(".building-*/.work/*.done.json")), "nothing was left to continue from"
    rerun = hvdllm(*prepare_args(corpus, out)) if ranks == 1 else hvdllm_mpi(ranks, *prepare_args(corpus, out))
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing the unfinished build" in rerun.stderr and "chunks were done" in rerun.stderr
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "whole")
    assert verify_folder(out) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the build folder is gone


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_first_of_exact_and_near_duplicates_is_kept(tmp_path, ranks):
    rng = random.Random(7)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    first = random_text(rng, 300)
    words = first.split()
    words[10] = "changed"
    texts = {"a.txt": random_text(rng, 300), "b.txt": first, "c.txt": first.upper(), "d.txt": " ".join(words) + "\n"}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    args = ["prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--seq-len", "8",
            "--val-fraction", "0", "--chunk-mb", "0.001"]
    run = hvdllm(*args) if ranks == 1 else hvdllm_mpi(ranks, *args)
    assert run.returncode == 0, run.stderr
    samples = ShardedSamples(tmp_path / "out", "train")
    stream = bytes(samples.rows(np.arange(len(samples)))[0].ravel().astype(np.uint8))
    samples.close()
    assert texts["a.txt"].encode()[:200] in stream and first.encode()[:200] in stream
    assert first.upper().encode()[:200] not in stream and b"changed" not in stream


def test_a_val_split_too_short_for_one_sample_is_a_warning(tmp_path):
    rng = random.Random(2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(random_text(rng, 14))  # ~100 bytes: one val document is short of a row
    run = hvdllm("prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--seq-len", "200",
                 "--val-fraction", "0.01", "--near-dup-threshold", "0")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stats"]["val_docs"] == 1 and manifest["stats"]["val_samples"] == 0
    assert "warning: the val split has" in run.stderr and "no evaluation and no early stopping" in run.stderr


def test_records_without_the_text_field_name_the_fields_they_have(tmp_path):
    rng = random.Random(4)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):  # one file a rank
        with open(corpus / f"part{part}.jsonl", "w") as f:
            for i in range(3):
                f.write(json.dumps({"id": i, "content": random_text(rng, 40), "lang": "en"}) + "\n")
    run = hvdllm_mpi(2, "prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0].split(" (rank")[0] == lines[1].split(" (rank")[0], run.stderr
    assert ("6 record(s) have no 'text' field (fields with text: content, lang): pass --text-field content"
            in lines[0]), lines[0]
