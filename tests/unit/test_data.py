import gzip
import json
import os
import random
import re

import h5py
import numpy as np
import pytest
from helpers.corpus import error_lines, hvdllm, hvdllm_mpi, make_corpus, random_text
from helpers.mounts import tmpfs

from hvdllm.data import DistributedBatches, ShardedSamples
from hvdllm.data.clean import normalize
from hvdllm.data.prepare import PrepareOptions, run_prepare
from hvdllm.data.shards import verify_folder
from hvdllm.data.tokenizer import EOS, load_tokenizer
from hvdllm.errors import UserError


def prepare(tmp_path, name="out", **kw):
    opts = PrepareOptions(out=str(tmp_path / name), **{"inputs": [str(tmp_path / "corpus")], "seq_len": 16,
                                                        "vocab_size": 300, **kw})
    return run_prepare(opts), tmp_path / name


def all_tokens(folder, split):
    samples = ShardedSamples(folder, split)
    tokens, mask = samples.rows(np.arange(len(samples)))
    samples.close()
    return tokens, mask


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_text_roundtrip_through_shards(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "messy.txt").write_text("Cafe\u0301 \x00with\x07 control\r\nchars " + random_text(random.Random(9), 60))
    _, out = prepare(tmp_path, tokenizer=tokenizer, val_fraction=0.0, near_dup_threshold=0.0)
    tok = load_tokenizer(out / "tokenizer.json")
    stream = all_tokens(out, "train")[0].reshape(-1).tolist()
    texts = tok.decode(stream, skip_special_tokens=False).split(EOS)
    files = sorted(p for p in corpus.iterdir())
    expected = []
    for path in files:
        if path.suffix == ".jsonl":
            expected += [normalize(json.loads(line)["text"]) for line in path.read_text().splitlines()]
        else:
            expected.append(normalize(path.read_text(errors="replace")))
    assert "Café with control\nchars" in expected[files.index(corpus / "messy.txt")]
    assert texts[:-1] == expected[:len(texts) - 1]  # every whole document comes back exactly
    assert expected[len(texts) - 1].startswith(texts[-1])  # the last one up to the dropped tail


def test_exact_and_near_duplicates_removed(tmp_path):
    rng = random.Random(3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    base = random_text(rng, 300)
    (corpus / "a.txt").write_text(base)
    (corpus / "b.txt").write_text("  " + base.upper().replace("\n", "\n\n"))  # exact after normalizing
    words = base.split()
    words[150] = "different"
    (corpus / "c.txt").write_text(" ".join(words))  # near duplicate, Jaccard ~0.97
    (corpus / "d.txt").write_text(random_text(rng, 300))  # distinct
    manifest, _ = prepare(tmp_path, val_fraction=0.0)
    stats = manifest["stats"]
    assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] == 1
    assert stats["train_docs"] == 2
    manifest, _ = prepare(tmp_path, name="loose", val_fraction=0.0, near_dup_threshold=0.0)
    assert manifest["stats"]["near_duplicates"] == 0 and manifest["stats"]["train_docs"] == 3


def test_manifest_and_shard_format(tmp_path):
    make_corpus(tmp_path / "corpus", files=10)
    manifest, out = prepare(tmp_path, samples_per_shard=20, val_fraction=0.2, tokenizer="byte")
    assert manifest["vocab_size"] == 258 and manifest["features"]["tokens"]["dtype"] == "uint16"
    splits = {e["split"] for e in manifest["shards"]}
    assert splits == {"train", "val"} and len(manifest["shards"]) > 2
    with h5py.File(out / manifest["shards"][0]["file"], "r") as f:
        assert f["tokens"].shape[1] == 17 and f["tokens"].dtype == np.uint16 and f["tokens"].chunks
        assert f.attrs["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    for step in ("tokenizer", "scan", "dedup", "split", "pack"):
        assert step in manifest["timing"]["seconds"] and manifest["timing"]["peak_rss_mb"][step] > 0
    assert verify_folder(out) == []
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_loss_mask_for_prompt_completion(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "sft.jsonl.gz", "wt") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"Question {i}: what is {i} plus one? ", "completion": f"It is {i + 1}."}) + "\n")
    _, out = prepare(tmp_path, tokenizer="byte", val_fraction=0.0, min_chars=5, near_dup_threshold=0.0)
    tokens, mask = all_tokens(out, "train")
    assert mask is not None and mask.shape == tokens.shape
    text = bytes(t for t in tokens.reshape(-1) if t < 256).decode()
    learned = bytes(t for t, m in zip(tokens.reshape(-1), mask.reshape(-1)) if m and t < 256).decode()
    assert "Question" in text and "Question" not in learned and "It is 2." in learned


def test_rank_slices_disjoint_complete_and_equal(tmp_path):
    make_corpus(tmp_path / "corpus", files=8)
    _, out = prepare(tmp_path, tokenizer="byte", val_fraction=0.0)
    samples = ShardedSamples(out, "train")
    n = len(samples)
    for size in (1, 2, 3):
        for batch in (1, 4, 7):
            loaders = [DistributedBatches(samples, r, size, batch, seed=5) for r in range(size)]
            counts = {ld.batches_per_epoch for ld in loaders}
            assert len(counts) == 1  # every rank yields the same number of batches
            order = loaders[0].epoch_order(0)
            seen = np.concatenate([ld.batch_indices(0, b) for ld in loaders for b in range(ld.batches_per_epoch)])
            assert sorted(seen.tolist()) == sorted(order.tolist())  # positions are disjoint
            assert set(seen.tolist()) == set(range(n))  # and cover every sample
            if n % (size * batch) == 0:
                assert len(set(seen.tolist())) == len(seen)
    # Two ranks of batch B see what one rank of batch 2B sees.
    one = DistributedBatches(samples, 0, 1, 8, seed=5)
    two = [DistributedBatches(samples, r, 2, 4, seed=5) for r in range(2)]
    for b in range(3):
        assert np.array_equal(one.batch_indices(1, b), np.concatenate([t.batch_indices(1, b) for t in two]))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_reproduces_batches(tmp_path, prefetch):
    make_corpus(tmp_path / "corpus", files=4)
    _, out = prepare(tmp_path, tokenizer="byte", val_fraction=0.0)
    samples = ShardedSamples(out, "train")
    loader = DistributedBatches(samples, 1, 2, 3, seed=7, prefetch=prefetch)
    total = loader.batches_per_epoch + 5  # across an epoch boundary
    it = iter(loader)
    straight = [next(it).inputs for _ in range(total)]
    loader.close()
    first = DistributedBatches(samples, 1, 2, 3, seed=7, prefetch=prefetch)
    it = iter(first)
    for _ in range(total - 7):
        next(it)
    state = first.state_dict()
    first.close()
    resumed = DistributedBatches(samples, 1, 2, 3, seed=7, prefetch=prefetch)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it = iter(resumed)
    tail = [next(it).inputs for _ in range(7)]
    resumed.close()
    for a, b in zip(straight[-7:], tail):
        assert np.array_equal(a, b)


def test_streamed_blocks_equal_whole_table(tmp_path):
    make_corpus(tmp_path / "corpus", files=6)
    _, out = prepare(tmp_path, tokenizer="byte", samples_per_shard=25)
    whole = ShardedSamples(out, "train")
    streamed = ShardedSamples(out, "train", cache_mb=0.002)  # a few chunks at a time
    assert whole._table is not None and streamed._table is None
    order = np.random.default_rng(0).permutation(len(whole))
    assert np.array_equal(whole.rows(order)[0], streamed.rows(order)[0])
    assert streamed._cache_bytes <= 0.002e6 or len(streamed._cache) == 1


def test_random_offset_windows_stay_in_stream(tmp_path):
    make_corpus(tmp_path / "corpus", files=3)
    _, out = prepare(tmp_path, tokenizer="byte", val_fraction=0.0, seq_len=16)
    samples = ShardedSamples(out, "train")
    stream = samples.rows(np.arange(len(samples)))[0].reshape(-1).tolist()
    text = "," + ",".join(map(str, stream)) + ","
    loader = DistributedBatches(samples, 0, 1, 4, seed=1, random_offset=True, prefetch=0)
    batch = next(iter(loader))
    for row_in, row_t in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert row_in[1:] == row_t[:-1]
        assert "," + ",".join(map(str, row_in + row_t[-1:])) + "," in text
    shorter = next(iter(DistributedBatches(samples, 0, 1, 4, seed=1, seq_len=8, prefetch=0)))
    assert shorter.inputs.shape == (4, 8)


def test_mpirun_two_ranks_equals_one_rank(tmp_path):
    make_corpus(tmp_path / "corpus", files=9, docs_per_jsonl=12)
    common = ["prepare", str(tmp_path / "corpus"), "--seq-len", "16", "--vocab-size", "300",
              "--val-fraction", "0.2", "--samples-per-shard", "10"]
    one = hvdllm(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = hvdllm_mpi(2, *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    ignore = {"files"}
    assert {k: v for k, v in m1["stats"].items() if k not in ignore} == \
        {k: v for k, v in m2["stats"].items() if k not in ignore}
    assert m2["timing"]["ranks"] == 2
    for split in ("train", "val"):
        a, b = all_tokens(tmp_path / "one", split)[0], all_tokens(tmp_path / "two", split)[0]
        assert a.shape == b.shape and np.array_equal(a, b)


# --- bad input: one line naming the culprit, non-zero exit (on every rank) -------------------

def test_nonexistent_path(tmp_path):
    result = hvdllm("prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and error_lines(result) == [f"error: {tmp_path / 'nope'}: no such file or folder"]


def test_empty_corpus_after_cleaning(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "tiny.txt").write_text("too short")
    result = hvdllm("prepare", str(corpus), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "empty corpus after cleaning" in error_lines(result)[0]


def test_binary_file_fails_on_every_rank(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", files=4)
    (corpus / "zz.txt").write_bytes(b"\x7fELF\x00\x00\x01" + bytes(range(256)) * 40)
    result = hvdllm_mpi(2, "prepare", str(corpus), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 2  # one line per rank
    # The rank that read it says so; the other names that rank and the file.
    assert all(f"{corpus / 'zz.txt'}: binary file" in line for line in lines)
    assert sum(line.startswith("error: rank ") for line in lines) == 1
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_bad_jsonl_line_skipped_or_strict(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", files=2)
    with open(corpus / "records.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"title": "no text field"}) + "\n")
    manifest, _ = prepare(tmp_path)
    assert manifest["stats"]["bad_json_lines"] == 1 and manifest["stats"]["missing_text"] == 1
    line_no = len((corpus / "records.jsonl").read_text().splitlines()) - 1
    result = hvdllm("prepare", str(corpus), "--strict", "--out", str(tmp_path / "strict"))
    assert result.returncode == 2
    assert error_lines(result)[0].startswith(f"error: {corpus / 'records.jsonl'}:{line_no}: not a JSON object")


def test_jsonl_text_that_is_not_a_string_is_counted_as_not_text_with_its_lines(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", files=2)
    records = corpus / "records.jsonl"
    first = len(records.read_text().splitlines()) + 1
    with open(records, "a") as f:
        for value in (7, ["a", "list"], None, {"a": 1}, ""):
            f.write(json.dumps({"text": value}) + "\n")
    result = hvdllm("prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--seq-len", "16",
                    "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "manifest.json").read_text())["stats"]
    assert stats["not_text"] == 4 and stats["missing_text"] == 1
    assert (f"4 record(s) whose 'text' is not text, skipped: {records}:{first} (number), "
            f"{records}:{first + 1} (array), {records}:{first + 2} (null), ..." in result.stderr)
    assert "1 empty, 4 not text" in result.stdout
    result = hvdllm("prepare", str(corpus), "--strict", "--out", str(tmp_path / "strict"))
    assert error_lines(result) == [f"error: {records}:{first}: 'text' is a JSON number, not text"]


@pytest.fixture
def dataset(tmp_path):
    make_corpus(tmp_path / "corpus", files=6)
    _, out = prepare(tmp_path, tokenizer="byte", samples_per_shard=30)
    return out


def _only_line(problems, path):
    assert len(problems) == 1 and problems[0].startswith(str(path)), problems


def test_truncated_shard(dataset):
    shard = dataset / "train-00000.h5"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{shard}: not a readable HDF5 shard"):
        ShardedSamples(dataset, "train")
    _only_line(verify_folder(dataset), shard)
    result = hvdllm("verify", str(dataset))
    assert result.returncode == 1 and str(shard) in result.stderr


def test_shards_disagree_on_seq_len_or_tokenizer(dataset):
    shard = dataset / "train-00001.h5"
    with h5py.File(shard, "r+") as f:
        f.attrs["seq_len"] = 99
    with pytest.raises(UserError, match=f"{shard}: seq_len is 99"):
        ShardedSamples(dataset, "train")
    with h5py.File(shard, "r+") as f:
        f.attrs["seq_len"] = 16
        f.attrs["tokenizer_sha256"] = "0" * 64
    with pytest.raises(UserError, match=f"{shard}: tokenizer_sha256"):
        ShardedSamples(dataset, "train")


def test_token_id_beyond_vocab(dataset):
    shard = dataset / "train-00000.h5"
    with h5py.File(shard, "r+") as f:
        f["tokens"][3, 5] = 300
    with pytest.raises(UserError, match=f"{shard}: token id 300 >= vocab size 258"):
        ShardedSamples(dataset, "train")  # a split that fits in memory is read, and checked, on open
    streamed = ShardedSamples(dataset, "train", cache_mb=0.001)  # one that does not: when read
    with pytest.raises(UserError, match=f"{shard}: token id 300 >= vocab size 258"):
        streamed.rows(np.arange(len(streamed)))
    assert any("token id 300" in p for p in verify_folder(dataset))


def test_a_shard_header_declaring_more_than_its_file_holds_is_named(dataset):
    """A 6 KB file whose header says (10**12, 17), and a manifest that agrees: refused by its
    name before anything is read, by the loader and by verify alike."""
    shard = dataset / "train-00000.h5"
    shard.unlink()
    manifest = json.loads((dataset / "manifest.json").read_text())
    with h5py.File(shard, "w") as f:
        f.attrs.update(format_version=1, seq_len=16, vocab_size=manifest["vocab_size"],
                       tokenizer_sha256=manifest["tokenizer"]["sha256"])
        f.create_dataset("tokens", shape=(10**12, 17), dtype=np.uint16, chunks=(1024, 17))  # no chunk written
    manifest["shards"][0]["samples"] = 10**12
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    message = f"{shard}: dataset 'tokens' declares shape (1000000000000, 17)"
    with pytest.raises(UserError, match=re.escape(message)):
        ShardedSamples(dataset, "train")
    assert any(p.startswith(message) for p in verify_folder(dataset))
    result = hvdllm("verify", str(dataset))
    assert result.returncode == 1 and message in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_missing_manifest_and_checksum(dataset):
    shard = dataset / "val-00000.h5"
    with h5py.File(shard, "r+") as f:
        f.attrs["note"] = "edited"  # still a sound file, but no longer the one in the manifest
    with pytest.raises(UserError, match=f"{shard}: sha256 does not match"):
        ShardedSamples(dataset, "val", verify_checksums=True)
    _only_line(verify_folder(dataset), shard)
    (dataset / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest"):
        ShardedSamples(dataset, "train")
    result = hvdllm("verify", str(dataset))
    assert result.returncode == 1 and "no manifest" in result.stderr


def test_existing_dataset_needs_overwrite(dataset, tmp_path):
    result = hvdllm("prepare", str(tmp_path / "corpus"), "--out", str(dataset))
    assert result.returncode == 2 and "--overwrite" in error_lines(result)[0]


def big_corpus(folder, megabytes: float):
    """Distinct random text files adding up to about ``megabytes``."""
    rng = random.Random(5)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(int(megabytes * 20)):
        (folder / f"big{i:03d}.txt").write_text(random_text(rng, 8000))  # ~50 KB each
    return folder


def test_failed_overwrite_on_a_full_disk_keeps_the_old_dataset(tmp_path):
    make_corpus(tmp_path / "corpus")
    big_corpus(tmp_path / "big", 2.0)
    with tmpfs(tmp_path / "disk", size_kb=1024) as disk:
        old = hvdllm("prepare", str(tmp_path / "corpus"), "--out", str(disk / "data"), "--tokenizer", "byte",
                     "--seq-len", "16", "--near-dup-threshold", "0")
        assert old.returncode == 0, old.stderr
        before = sorted(p.name for p in (disk / "data").iterdir())
        (disk / "data" / "notes.txt").write_text("the user's own file")  # not part of the dataset
        full = hvdllm("prepare", str(tmp_path / "big"), "--out", str(disk / "data"), "--tokenizer", "byte",
                      "--seq-len", "16", "--near-dup-threshold", "0", "--samples-per-shard", "4096", "--overwrite")
        assert full.returncode == 2, full.stderr
        assert error_lines(full) and "No space left on device" in error_lines(full)[0], full.stderr
        assert "Traceback" not in full.stderr
        assert verify_folder(disk / "data") == []  # the old dataset is whole
        assert sorted(p.name for p in (disk / "data").iterdir()) == sorted(before + ["notes.txt"])


def test_overwrite_replaces_the_dataset_and_keeps_other_files(tmp_path):
    make_corpus(tmp_path / "corpus")
    _, out = prepare(tmp_path, tokenizer="byte", samples_per_shard=8)
    (out / "notes.txt").write_text("the user's own file")
    many = {p.name for p in out.glob("*.h5")}
    manifest, _ = prepare(tmp_path, tokenizer="byte", samples_per_shard=4096, overwrite=True)
    assert verify_folder(out) == []
    assert {p.name for p in out.glob("*.h5")} == {e["file"] for e in manifest["shards"]} != many
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no build folder left


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_unwritable_out_is_one_line_on_every_rank(tmp_path, where):
    make_corpus(tmp_path / "corpus")
    args = ["prepare", str(tmp_path / "corpus"), "--tokenizer", "byte", "--seq-len", "16"]
    if where == "file":
        (tmp_path / "taken").write_text("x")
        result = hvdllm_mpi(2, *args, "--out", str(tmp_path / "taken" / "data"), timeout=60)
        expected = f"--out {tmp_path / 'taken' / 'data'}: {tmp_path / 'taken'} is a file, not a folder"
    else:
        with tmpfs(tmp_path / "ro", size_kb=64, read_only=True) as ro:
            result = hvdllm_mpi(2, *args, "--out", str(ro / "data"), timeout=60)
        expected = f"--out {ro / 'data'} is not writable (cannot be created in {ro}): Read-only file system"
    lines = error_lines(result)
    assert result.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text, seq_len", [("tiny", 16), ("a corpus of some forty-odd bytes in all", 4096)])
def test_corpus_shorter_than_one_sample_is_an_error(tmp_path, text, seq_len):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "short.txt").write_text(text)
    result = hvdllm("prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte",
                    "--val-fraction", "0", "--min-chars", "1", "--seq-len", str(seq_len))
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    assert f"has {len(text) + 1} tokens, fewer than one sample of --seq-len {seq_len}" in error_lines(result)[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_verify_calls_an_empty_dataset_unsound(dataset):
    manifest_path = dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"] = [e for e in manifest["shards"] if e["split"] != "train"]
    manifest_path.write_text(json.dumps(manifest))
    assert any("no training samples" in line for line in verify_folder(dataset))


@pytest.mark.parametrize("damage, message", [
    (lambda m: [m], "not a manifest (a JSON list, not an object)"),
    (lambda m: {**m, "shards": {"train": 1}}, "'shards' must be a list"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "samples": "many"}]}, "shards[0]: 'samples' must be a int"),
    (lambda m: {**m, "tokenizer": "byte"}, "'tokenizer' must be a dict"),
])
def test_manifest_of_the_wrong_shape_is_one_line(dataset, damage, message):
    path = dataset / "manifest.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    result = hvdllm("verify", str(dataset))
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(UserError, match=re.escape(message)):
        ShardedSamples(dataset, "train")


def test_data_folder_without_tokenizer_or_given_as_a_file(dataset):
    (dataset / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=re.escape(f"tokenizer {dataset / 'tokenizer.json'} does not exist")):
        ShardedSamples(dataset, "train")
    with pytest.raises(UserError, match=re.escape(f"data folder {dataset / 'manifest.json'} is a file, not a folder")):
        ShardedSamples(dataset / "manifest.json", "train")


def test_folder_files_are_recognised_by_content_and_skips_are_named(tmp_path):
    rng = random.Random(7)
    corpus = tmp_path / "corpus"
    (corpus / ".git").mkdir(parents=True)
    (corpus / "README").write_text(random_text(rng, 100))  # text without a suffix
    (corpus / "table.csv").write_text(random_text(rng, 100))
    (corpus / "image.png").write_bytes(bytes(range(256)) * 20)
    (corpus / ".git" / "config").write_text("[core]\n")
    result = hvdllm("prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--seq-len", "16",
                    "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["stats"]["files"] == 2
    assert (f"skipped 2 files: 1 binary ({corpus / 'image.png'}), 1 hidden ({corpus / '.git' / 'config'})"
            in result.stderr)


@pytest.mark.parametrize("name_it", ["directly", "by a glob", "in its folder"])
def test_a_pipe_is_skipped_and_named_not_read(tmp_path, name_it):
    """Reading a FIFO blocks until someone writes to it: prepare never opens one."""
    corpus = make_corpus(tmp_path / "corpus")
    fifo = corpus / "pipe.txt"
    os.mkfifo(fifo)
    inputs = {"directly": [str(corpus / "doc00.txt"), str(fifo)], "by a glob": [str(corpus / "*.txt")],
              "in its folder": [str(corpus)]}[name_it]
    result = hvdllm("prepare", *inputs, "--out", str(tmp_path / "out"), "--tokenizer", "byte", "--seq-len", "16",
                    "--val-fraction", "0", timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"1 pipe ({fifo})" in result.stderr


def test_folder_of_binaries_says_what_was_skipped(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "model.bin").write_bytes(bytes(range(256)) * 20)
    result = hvdllm("prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", "byte")
    assert result.returncode == 2
    assert error_lines(result) == [f"error: no input files found in {corpus}; skipped 1 file: 1 binary "
                                   f"({corpus / 'model.bin'})"]


def test_huge_seq_len_is_one_line(tmp_path):
    make_corpus(tmp_path / "corpus")
    result = hvdllm("prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "out"), "--seq-len", str(10**22))
    assert result.returncode == 2
    assert error_lines(result) == [f"error: --seq-len is out of range: {10**22}"], result.stderr
