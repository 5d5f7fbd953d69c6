"""``hvdllm prepare``: raw text -> clean -> dedup -> tokenize -> pack -> HDF5 shards + manifest.

Under ``mpirun -np N`` the sorted input files are cut into N contiguous blocks (balanced by
bytes), one per rank, so that concatenating the ranks' documents in rank order gives the
1-rank order. Every decision that must be global is made on data gathered from all ranks in
that order: exact dedup (first occurrence wins), near-dedup (on rank 0), the train/val split
(a seeded hash of the content), the tokenizer (trained on rank 0), and packing (each rank
knows the global offset of its token stream and borrows the few tokens its last sample needs
from the next ranks). So the samples, in order, are the same whatever N is; only where the
shard files are cut differs. Rank 0 writes the manifest last.

The new dataset is built in a hidden folder inside --out and moved into place (renames only)
once complete, so a failure part way (a full disk) leaves any old dataset there intact.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hvdllm.atomic import write_json_atomic, write_text_atomic
from hvdllm.comm.mpi import phase, world
from hvdllm.data import build_folder, shards
from hvdllm.data.clean import clean_reason, normalize
from hvdllm.data.dedup import MinHasher, NearDuplicateIndex, exact_hash
from hvdllm.data.sources import Document, ReadStats, Skipped, preset_files, read_documents, resolve_inputs
from hvdllm.data.tokenizer import byte_tokenizer, eos_id, load_tokenizer, tokenizer_sha256, train_bpe
from hvdllm.errors import UserError
from hvdllm.paths import require_file, require_writable_folder

SPLITS = ("train", "val")
MAX_SEQ_LEN = 1 << 24  # tokens per sample; beyond it a row of a shard would not fit in memory


@dataclass
class PrepareOptions:
    out: str
    inputs: list[str] = field(default_factory=list)
    preset: str = ""  # a built-in corpus instead of inputs, e.g. python-stdlib
    text_field: str = "text"
    strict: bool = False  # a malformed JSONL line is an error instead of being skipped
    min_chars: int = 64
    max_noise: float = 0.1  # drop documents with more than this share of junk characters
    near_dup_threshold: float = 0.8  # MinHash Jaccard threshold; 0 = no near-dedup
    shingle: int = 5
    num_perm: int = 128
    tokenizer: str = "bpe"  # bpe | byte | path to tokenizer.json
    vocab_size: int = 4096
    tokenizer_sample_mb: float = 256.0  # text the BPE trainer sees at most
    seq_len: int = 256
    val_fraction: float = 0.05
    seed: int = 1234
    samples_per_shard: int = 8192
    overwrite: bool = False

    def validate(self) -> None:
        if bool(self.inputs) == bool(self.preset):
            raise UserError("give input paths or --preset, not both or neither")
        checks = {"--seq-len": 1 <= self.seq_len <= MAX_SEQ_LEN, "--vocab-size": 258 <= self.vocab_size <= 1 << 32,
                  "--val-fraction": 0 <= self.val_fraction < 1, "--min-chars": self.min_chars >= 0,
                  "--max-noise": 0 <= self.max_noise <= 1, "--near-dup-threshold": 0 <= self.near_dup_threshold <= 1,
                  "--samples-per-shard": self.samples_per_shard >= 1, "--shingle": self.shingle >= 1,
                  "--num-perm": self.num_perm >= 1}
        for flag, ok in checks.items():
            if not ok:
                raise UserError(f"{flag} is out of range: {getattr(self, flag[2:].replace('-', '_'))}")


def _unit_hash(seed: int, digest: bytes) -> float:
    """A number in [0, 1) fixed by seed and content: the same on every rank and every run."""
    h = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + digest, digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def _my_files(files: list[Path], rank: int, size: int) -> list[tuple[int, Path]]:
    """Rank's contiguous block of the sorted file list, cut where the byte count crosses r/N."""
    sizes = np.array([max(1, f.stat().st_size) for f in files], dtype=np.float64)
    starts = np.concatenate(([0.0], np.cumsum(sizes)[:-1])) / sizes.sum()
    owner = np.minimum((starts * size).astype(int), size - 1)
    return [(i, f) for i, f in enumerate(files) if owner[i] == rank]


def _read_and_clean(my_files, opts: PrepareOptions, stats: Counter, rank: int) -> list[Document]:
    read = ReadStats()
    docs = []
    bar = tqdm(my_files, desc="read+clean", unit="file", disable=True if rank else None)
    for index, path in bar:
        for doc in read_documents(index, path, opts.text_field, opts.strict, read):
            if doc.prompt_chars:
                prompt = normalize(doc.text[:doc.prompt_chars])
                doc.text, doc.prompt_chars = prompt + normalize(doc.text[doc.prompt_chars:]), len(prompt)
            else:
                doc.text = normalize(doc.text)
            reason = clean_reason(doc.text, opts.min_chars, opts.max_noise)
            if reason:
                stats[f"dropped_{reason}"] += 1
            else:
                docs.append(doc)
        bar.set_postfix(docs=len(docs))
    stats.update(read.counts())
    if read.not_text_at:  # one write: ranks must not interleave
        more = ", ..." if read.not_text > len(read.not_text_at) else ""
        print(f"warning: {read.not_text} JSONL record(s) whose {opts.text_field!r} is not text, skipped: "
              f"{', '.join(read.not_text_at)}{more}", file=sys.stderr, flush=True)
    return docs


def _global_dedup(comm, docs: list[Document], opts: PrepareOptions, stats: Counter):
    """Drop exact and near duplicates in the global order; returns (docs, global kept list of
    (key, exact hash, chars))."""
    local = [(d.key, exact_hash(d.text), len(d.text)) for d in docs]
    everything = [item for part in comm.allgather(local) for item in part]  # global order
    seen, exact_dups = set(), set()
    for key, digest, _ in everything:
        if digest in seen:
            exact_dups.add(key)
        else:
            seen.add(digest)
    stats["exact_duplicates"] = len(exact_dups)  # the same on every rank: a global count
    docs = [d for d in docs if d.key not in exact_dups]

    near_dups: set = set()
    if opts.near_dup_threshold > 0:
        hasher = MinHasher(num_perm=opts.num_perm, shingle=opts.shingle, seed=opts.seed)
        gathered = comm.gather([(d.key, hasher.signature(d.text)) for d in docs], root=0)
        if comm.rank == 0:
            index = NearDuplicateIndex(opts.num_perm, opts.near_dup_threshold)
            near_dups = {key for part in gathered for key, sig in part if index.is_duplicate_then_add(sig)}
        near_dups = comm.bcast(near_dups, root=0)
    stats["near_duplicates"] = len(near_dups)
    docs = [d for d in docs if d.key not in near_dups]
    kept = [item for item in everything if item[0] not in exact_dups and item[0] not in near_dups]
    return docs, kept


def _assign_splits(kept, opts: PrepareOptions) -> dict:
    """key -> split, by a seeded hash of the content; at least one val document when asked."""
    scores = {key: _unit_hash(opts.seed, digest) for key, digest, _ in kept}
    split = {key: ("val" if score < opts.val_fraction else "train") for key, score in scores.items()}
    if opts.val_fraction > 0 and len(kept) > 1 and "val" not in split.values():
        split[min(scores, key=scores.get)] = "val"
    return split


def _build_tokenizer(comm, docs, kept, split, opts: PrepareOptions):
    if opts.tokenizer == "byte":
        return byte_tokenizer()
    if opts.tokenizer != "bpe":
        return load_tokenizer(opts.tokenizer)
    train_chars = sum(chars for key, _, chars in kept if split[key] == "train") or 1
    share = min(1.0, opts.tokenizer_sample_mb * 1e6 / train_chars)
    sample = [d.text for d in docs if split[d.key] == "train" and _unit_hash(opts.seed + 1, exact_hash(d.text)) < share]
    texts = comm.gather(sample, root=0)
    tok_json = None
    if comm.rank == 0:
        tok_json = train_bpe((t for part in texts for t in part), opts.vocab_size).to_str()
    from tokenizers import Tokenizer

    return Tokenizer.from_str(comm.bcast(tok_json, root=0))


def _encode(docs, split, tok, with_mask: bool, rank: int):
    """Per split: the token stream (docs joined with EOS) and its loss mask (or None)."""
    eos = eos_id(tok)
    streams = {s: [] for s in SPLITS}
    masks = {s: [] for s in SPLITS}
    bar = tqdm(total=len(docs), desc="tokenize", unit="doc", disable=True if rank else None)
    batch = 256
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        for doc, enc in zip(chunk, tok.encode_batch([d.text for d in chunk])):
            ids = np.asarray(enc.ids + [eos], dtype=np.uint32)
            streams[split[doc.key]].append(ids)
            if with_mask:
                # A token is learned from when it starts inside the completion (EOS always).
                starts = np.asarray([o[0] for o in enc.offsets] + [len(doc.text)], dtype=np.int64)
                masks[split[doc.key]].append((starts >= doc.prompt_chars).astype(np.uint8))
        bar.update(len(chunk))
        bar.set_postfix(tokens=sum(len(a) for s in streams.values() for a in s))
    bar.close()
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
    return ({s: cat(streams[s], np.uint32) for s in SPLITS},
            {s: cat(masks[s], np.uint8) for s in SPLITS} if with_mask else None)


def _my_samples(comm, stream: np.ndarray, row: int) -> tuple[np.ndarray, int]:
    """This rank's rows of the global stream cut into rows of ``row`` tokens, and the index of
    its first row. A row belongs to the rank holding its first token; the tokens it runs
    past the end of this rank's stream come from the heads of the following ranks."""
    lengths = comm.allgather(len(stream))
    heads = comm.allgather(stream[:row])
    start = sum(lengths[:comm.rank])
    total_rows = sum(lengths) // row
    first = -(-start // row)  # ceil
    last = min(total_rows, -(-(start + len(stream)) // row))  # exclusive
    if last <= first:
        return np.zeros((0, row), dtype=stream.dtype), first
    borrowed = np.concatenate([stream] + heads[comm.rank + 1:])[: (last * row) - start]
    return borrowed[first * row - start:].reshape(last - first, row), first


def run_prepare(opts: PrepareOptions) -> dict:
    """Run the whole pipeline on every rank of MPI_COMM_WORLD; returns the manifest on rank 0
    (and an empty dict elsewhere)."""
    comm = world()
    rank, size = comm.rank, comm.size
    out = Path(opts.out)
    stats: Counter = Counter()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = now - clock
        clock = now

    with phase(comm):
        opts.validate()
        skipped = Skipped()
        files = preset_files(opts.preset) if opts.preset else resolve_inputs(opts.inputs, skipped)
        if rank == 0 and skipped.by_reason:
            print(skipped.describe(), file=sys.stderr, flush=True)
        if opts.tokenizer not in ("bpe", "byte"):
            require_file(opts.tokenizer, "tokenizer file", " (or use --tokenizer bpe|byte)")
        require_writable_folder(out, "--out")
        if (out / shards.MANIFEST).exists() and not opts.overwrite:
            raise UserError(f"{out / shards.MANIFEST} exists: pass --overwrite to replace that dataset")
    with phase(comm):
        docs = _read_and_clean(_my_files(files, rank, size), opts, stats, rank)
    lap("read_clean")
    docs, kept = _global_dedup(comm, docs, opts, stats)
    lap("dedup")
    with phase(comm):
        if not kept:
            raise UserError(f"empty corpus after cleaning: no document of {len(files)} file(s) is left "
                            f"(min_chars={opts.min_chars}, max_noise={opts.max_noise})")
    split = _assign_splits(kept, opts)
    with phase(comm):
        tok = _build_tokenizer(comm, docs, kept, split, opts)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    lap("tokenizer")
    with_mask = bool(comm.allreduce(int(any(d.prompt_chars for d in docs))))
    streams, masks = _encode(docs, split, tok, with_mask, rank)
    lap("tokenize")

    # Everything is written into a hidden folder inside --out and moved into place at the end,
    # so a failure (a full disk) leaves the old dataset as it was.
    with phase(comm):
        build = build_folder.make_build_folder(comm, out)
    try:
        manifest = _pack_and_write(comm, opts, build, streams, masks, tok, vocab_size, with_mask, docs, split,
                                   stats, timings, lap)
        with phase(comm):
            if rank == 0:
                build_folder.move_into_place(build, out)
    finally:
        if rank == 0:
            shutil.rmtree(build, ignore_errors=True)
    return manifest


def _pack_and_write(comm, opts: PrepareOptions, out: Path, streams, masks, tok, vocab_size: int, with_mask: bool,
                    docs, split, stats: Counter, timings: dict, lap) -> dict:
    """Cut the token streams into samples, write this rank's shards into ``out`` and, on rank
    0, the tokenizer and the manifest; returns the manifest on rank 0 (else {})."""
    rank, size = comm.rank, comm.size
    row = opts.seq_len + 1
    dtype = shards.token_dtype(vocab_size)
    tok_sha = tokenizer_sha256(tok)
    attrs = {"format_version": shards.FORMAT_VERSION, "seq_len": opts.seq_len, "vocab_size": vocab_size,
             "tokenizer_sha256": tok_sha}
    # Every collective comes first, on every rank; the phases below hold local work only, so a
    # failure on one rank can never leave another waiting in a different collective.
    samples = {}
    for s in SPLITS:
        rows, _ = _my_samples(comm, streams[s], row)
        mask_rows = _my_samples(comm, masks[s], row)[0] if masks else None
        samples[s] = rows, mask_rows, comm.allgather(-(-len(rows) // opts.samples_per_shard))
    if sum(samples["train"][2]) == 0:  # the same on every rank: a global count
        raise UserError(_too_short(comm, streams["train"], opts.seq_len))
    entries = []
    with phase(comm):
        for s in SPLITS:
            rows, mask_rows, counts = samples[s]
            if len(rows) and int(rows.max()) >= vocab_size:
                raise UserError(f"{opts.tokenizer}: produced token id {int(rows.max())} >= vocab size {vocab_size}")
            number = sum(counts[:rank])
            for begin in range(0, len(rows), opts.samples_per_shard):
                name = f"{s}-{number:05d}.h5"
                features = {"tokens": rows[begin:begin + opts.samples_per_shard].astype(dtype)}
                if mask_rows is not None:
                    features["loss_mask"] = mask_rows[begin:begin + opts.samples_per_shard]
                with build_folder.writing(out / name):
                    digest = shards.write_shard(out / name, features, {**attrs, "split": s})
                entries.append({"file": name, "split": s, "samples": len(features["tokens"]),
                                "tokens": int(features["tokens"].size), "sha256": digest})
                number += 1
            stats[f"{s}_tokens_in_stream"] += len(streams[s])
            stats[f"{s}_docs"] += sum(1 for d in docs if split[d.key] == s)
    lap("pack_write")

    all_entries = comm.gather(entries, root=0)
    all_stats = comm.gather(stats, root=0)
    all_timings = comm.gather(timings, root=0)
    manifest: dict = {}
    with phase(comm):
        if rank == 0:
            # Written as to_str() exactly, so the file's sha256 is the one in the manifest.
            with build_folder.writing(out / "tokenizer.json"):
                write_text_atomic(out / "tokenizer.json", tok.to_str())
            manifest = _manifest(opts, size, vocab_size, tok_sha, dtype, with_mask, all_entries, all_stats,
                                 all_timings)
            with build_folder.writing(out / shards.MANIFEST):
                write_json_atomic(out / shards.MANIFEST, manifest)
    return manifest


def _too_short(comm, stream: np.ndarray, seq_len: int) -> str:
    tokens = comm.allreduce(len(stream))
    return (f"the training text has {tokens} tokens, fewer than one sample of --seq-len {seq_len} + 1: "
            "add text or lower --seq-len")


def _manifest(opts, size, vocab_size, tok_sha, dtype, with_mask, all_entries, all_stats, all_timings) -> dict:
    global_counts = ("exact_duplicates", "near_duplicates")  # already global on every rank
    total = Counter()
    for part in all_stats:
        total.update({k: v for k, v in part.items() if k not in global_counts})
    for key in global_counts:
        total[key] = all_stats[0].get(key, 0)
    entries = sorted((e for part in all_entries for e in part), key=lambda e: (SPLITS.index(e["split"]), e["file"]))
    row = opts.seq_len + 1
    for s in SPLITS:
        packed = sum(e["tokens"] for e in entries if e["split"] == s)
        total[f"{s}_samples"] = packed // row
        total[f"{s}_tokens_dropped_tail"] = total.pop(f"{s}_tokens_in_stream", 0) - packed
    slowest = {step: max(t.get(step, 0.0) for t in all_timings) for step in all_timings[0]}
    elapsed = sum(slowest.values())
    features = {"tokens": {"shape": [row], "dtype": dtype.name}}
    if with_mask:
        features["loss_mask"] = {"shape": [row], "dtype": "uint8"}
    return {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "seq_len": opts.seq_len,
        "vocab_size": vocab_size,
        "tokenizer": {"file": "tokenizer.json", "sha256": tok_sha, "kind": opts.tokenizer},
        "features": features,
        "shards": entries,
        "stats": dict(sorted(total.items())),
        "timing": {"ranks": size, "seconds": slowest, "total_seconds": elapsed,
                   "mb_per_s_per_rank": total["bytes"] / 1e6 / max(elapsed, 1e-9) / size},
        "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "overwrite")},
    }


def print_summary(manifest: dict, file=sys.stdout) -> None:
    st = manifest["stats"]
    print(f"read {st.get('files', 0)} files ({st.get('bytes', 0) / 1e6:.1f} MB, {st.get('records', 0)} records); "
          f"dropped: {st.get('missing_text', 0)} empty, {st.get('not_text', 0)} not text, "
          f"{st.get('bad_json_lines', 0)} bad JSON, "
          f"{st.get('dropped_short', 0)} short, {st.get('dropped_noisy', 0)} noisy, "
          f"{st.get('exact_duplicates', 0)} exact duplicates, {st.get('near_duplicates', 0)} near duplicates",
          file=file)
    print(f"train: {st.get('train_docs', 0)} docs, {st.get('train_samples', 0)} samples; "
          f"val: {st.get('val_docs', 0)} docs, {st.get('val_samples', 0)} samples of {manifest['seq_len'] + 1} "
          f"tokens; vocab {manifest['vocab_size']}; {len(manifest['shards'])} shards; "
          f"{manifest['timing']['mb_per_s_per_rank']:.2f} MB/s per rank", file=file)
