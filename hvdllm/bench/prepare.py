"""``hvdllm bench prepare``: ``hvdllm prepare`` against raw ``Tokenizer.encode_batch`` on the
same bytes, the same tokenizer and the same thread count, in one run; its scaling from 1 to 2
ranks; and its peak RSS on two corpus sizes.

The corpus is synthetic JSONL (distinct documents of Zipf-distributed pseudo-words, so
deduplication drops nothing and every byte is tokenized by both). The tokenizer is a BPE
trained once on the small corpus and handed to both as a file. Rates are MB of input per
second of the work itself (the manifest's phase seconds; the raw loop's own clock), so the
interpreter's start-up counts for neither. Targets (issue 24): prepare at least 0.8 x raw's
MB/s at 1 rank; 2 ranks of one thread at least 1.8 x one rank of one thread; the large
corpus's peak RSS less than 1.3 x the small one's.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hvdllm.bench.options import PrepareBenchOptions
from hvdllm.bench.train import run_command
from hvdllm.comm.launch import mpirun_command


def write_corpus(folder: Path, megabytes: float, seed: int, files: int = 16) -> Path:
    """``files`` JSONL files of distinct documents (about 3 kB each), ``megabytes`` in all: a
    corpus comes in many files, which is what spreads it over ranks."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocabulary = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20000)]
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    folder.mkdir()
    for index in range(files):
        written, target = 0, megabytes * 1e6 / files
        with open(folder / f"part-{index:04d}.jsonl", "w") as out:
            while written < target:
                words = rng.choice(len(vocabulary), size=int(rng.integers(200, 800)), p=weights)
                lines = [" ".join(vocabulary[w] for w in words[i:i + 12]).capitalize() + "."
                         for i in range(0, len(words), 12)]
                line = json.dumps({"text": "\n".join(lines)}) + "\n"
                out.write(line)
                written += len(line)
    return folder


def raw_encode(corpus: str, tokenizer: str) -> dict:
    """The baseline, run in its own process (RAYON_NUM_THREADS set by the caller): read the
    JSONL, parse it, encode_batch in batches. Returns MB/s."""
    from tokenizers import Tokenizer

    from hvdllm.data.encode import BATCH_CHARS

    tok = Tokenizer.from_file(tokenizer)
    files = sorted(Path(corpus).iterdir())
    start, batch, chars, tokens = time.perf_counter(), [], 0, 0
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                text = json.loads(line)["text"]
                batch.append(text)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
                    batch, chars = [], 0
    tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
    seconds = time.perf_counter() - start
    return {"mb_per_s": sum(p.stat().st_size for p in files) / 1e6 / seconds, "tokens": tokens}


def _raw(corpus: Path, tokenizer: Path, threads: int) -> dict:
    out = run_command([sys.executable, "-m", "hvdllm.bench.prepare", str(corpus), str(tokenizer)],
                      dict(os.environ, RAYON_NUM_THREADS=str(threads)))
    return json.loads(out.strip().splitlines()[-1])


def _prepare(corpus: Path, tokenizer: Path, out: Path, ranks: int, threads: int) -> dict:
    argv = ["-m", "hvdllm", "prepare", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer),
            "--threads", str(threads), "--seq-len", "256", "--val-fraction", "0.01", "--overwrite"]
    run_command(mpirun_command(ranks, argv) if ranks > 1 else [sys.executable, *argv])
    manifest = json.loads((out / "manifest.json").read_text())
    timing = manifest["timing"]
    return {"mb_per_s": manifest["stats"]["bytes"] / 1e6 / timing["total_seconds"],
            "peak_rss_mb": max(timing["peak_rss_mb"].values()), "seconds": timing["seconds"]}


def _train_tokenizer(corpus: Path, path: Path) -> Path:
    from hvdllm.data.tokenizer import train_bpe

    texts = [json.loads(line)["text"] for path in sorted(corpus.iterdir()) for line in path.read_text().splitlines()]
    path.write_text(train_bpe(texts, 4096).to_str())
    return path


def bench_prepare(options: PrepareBenchOptions) -> dict:
    with tempfile.TemporaryDirectory(prefix="hvdllm-bench-prepare-") as tmp:
        folder = Path(tmp)
        small = write_corpus(folder / "small", options.mb, seed=0)
        tokenizer = _train_tokenizer(small, folder / "tokenizer.json")
        rounds = []
        for _ in range(options.rounds):
            rounds.append({"raw": _raw(small, tokenizer, options.threads)["mb_per_s"],
                           "prepare": _prepare(small, tokenizer, folder / "out", 1, options.threads)["mb_per_s"],
                           "one_rank_one_thread": _prepare(small, tokenizer, folder / "out", 1, 1)["mb_per_s"],
                           "two_ranks_one_thread": _prepare(small, tokenizer, folder / "out", 2, 1)["mb_per_s"]})
        small_run = _prepare(small, tokenizer, folder / "out", 1, options.threads)
        large = write_corpus(folder / "large", options.mb * options.scale, seed=1)
        large_run = _prepare(large, tokenizer, folder / "out", 1, options.threads)
    median = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    return {
        "benchmark": "prepare", "mb": options.mb, "threads": options.threads, "rounds": rounds,
        "mb_per_s": median,
        "prepare_over_raw": statistics.median(r["prepare"] / r["raw"] for r in rounds),
        "two_ranks_over_one": statistics.median(r["two_ranks_one_thread"] / r["one_rank_one_thread"] for r in rounds),
        "peak_rss_mb": {f"{options.mb:g} MB": small_run["peak_rss_mb"],
                        f"{options.mb * options.scale:g} MB": large_run["peak_rss_mb"]},
        "rss_ratio": large_run["peak_rss_mb"] / small_run["peak_rss_mb"],
        "phase_seconds": {"small": small_run["seconds"], "large": large_run["seconds"]},
    }


def summary(result: dict) -> str:
    rates = result["mb_per_s"]
    sizes = list(result["peak_rss_mb"].items())
    return (f"prepare {rates['prepare']:.2f} MB/s, raw encode_batch {rates['raw']:.2f} MB/s "
            f"({result['threads']} thread(s)): x{result['prepare_over_raw']:.2f} (target >= 0.8)\n"
            f"2 ranks x 1 thread {rates['two_ranks_one_thread']:.2f} MB/s, 1 rank x 1 thread "
            f"{rates['one_rank_one_thread']:.2f} MB/s: x{result['two_ranks_over_one']:.2f} (target >= 1.8)\n"
            f"peak RSS {sizes[0][1]:.0f} MB on {sizes[0][0]}, {sizes[1][1]:.0f} MB on {sizes[1][0]}: "
            f"x{result['rss_ratio']:.2f} (target < 1.3)")


if __name__ == "__main__":  # the raw baseline's process
    print(json.dumps(raw_encode(sys.argv[1], sys.argv[2])))
