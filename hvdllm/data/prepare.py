"""``hvdllm prepare``: raw text -> clean -> dedup -> tokenize -> pack -> HDF5 shards + manifest.

Under ``mpirun -np N`` the sorted input files are cut into N contiguous blocks (balanced by
bytes), one per rank, so that the ranks' documents in rank order are the 1-rank order. Each
rank streams its block in chunks (work.py):

1. tokenizer: byte, a file, or BPE trained on rank 0 from a seeded sample of the documents;
2. scan: clean, hash, MinHash and tokenize each document, keeping 25 bytes of it in memory
   and the rest on disk (scan.py, encode.py);
3. dedup over the ranks by hashing to owners (spread_dedup.py); the train/val split by a
   seeded hash of the content;
4. split: the kept documents' tokens copied into each split's stream (encode.py);
5. pack the global stream into rows and shards that are the same for any number of ranks
   (packing.py); rank 0 writes the tokenizer and the manifest last.

So the kept documents, the tokens and the shards are the same whatever N is, and memory does
not grow with the corpus. The dataset is built in a hidden folder inside --out named by a
fingerprint of the arguments, and moved into place (renames only) once complete: a failure
part way leaves any old dataset intact, and a prepare killed at any moment and run again
continues from its finished chunks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hvdllm.atomic import write_json_atomic, write_text_atomic
from hvdllm.comm.mpi import phase, world
from hvdllm.comm.runtime import threads_per_rank
from hvdllm.data import build_folder, shards
from hvdllm.data.clean import cleaned_documents
from hvdllm.data.dedup import MinHasher, exact_hash
from hvdllm.data.encode import MASK_DTYPE, SPLITS, TOKEN_DTYPE, split_chunk, stream_files
from hvdllm.data.manifest import build_manifest
from hvdllm.data.packing import ShardPlan, Stream, exchange_heads, write_shards
from hvdllm.data.phases import Phases
from hvdllm.data.scan import Sketches, load_scan, scan_chunk, token_counts
from hvdllm.data.sources import ReadStats, Skipped, preset_files, resolve_inputs
from hvdllm.data.spread_dedup import Numbering, exact_duplicates, near_duplicates
from hvdllm.data.tokenizer import byte_tokenizer, load_tokenizer, tokenizer_sha256, train_bpe
from hvdllm.data.work import Chunk, WorkFolder, fingerprint, plan_chunks
from hvdllm.errors import UserError
from hvdllm.paths import require_file, require_writable_folder

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
    chunk_mb: float = 64.0  # input a rank finishes (and a rerun skips) at a time
    threads: int = 0  # tokenizers' threads per rank; 0 = the node's cores / its ranks
    overwrite: bool = False

    def validate(self) -> None:
        if bool(self.inputs) == bool(self.preset):
            raise UserError("give input paths or --preset, not both or neither")
        checks = {"--seq-len": 1 <= self.seq_len <= MAX_SEQ_LEN, "--vocab-size": 258 <= self.vocab_size <= 1 << 32,
                  "--val-fraction": 0 <= self.val_fraction < 1, "--min-chars": self.min_chars >= 0,
                  "--max-noise": 0 <= self.max_noise <= 1, "--near-dup-threshold": 0 <= self.near_dup_threshold <= 1,
                  "--samples-per-shard": self.samples_per_shard >= 1, "--shingle": self.shingle >= 1,
                  "--num-perm": self.num_perm >= 1, "--chunk-mb": self.chunk_mb > 0, "--threads": self.threads >= 0,
                  "--seed": 0 <= self.seed < 1 << 62}
        for flag, ok in checks.items():
            if not ok:
                raise UserError(f"{flag} is out of range: {getattr(self, flag[2:].replace('-', '_'))}")

    def result_options(self) -> dict:
        """The options the dataset depends on (not where it goes, nor how it is scheduled)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "overwrite", "chunk_mb", "threads")}


def _unit_hash(seed: int, digest: bytes) -> float:
    """A number in [0, 1) fixed by seed and content: the same on every rank and run."""
    salted = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + digest, digest_size=8).digest()
    return int.from_bytes(salted, "little") / 2**64


def _unit_hashes(seed: int, hashes: np.ndarray) -> np.ndarray:
    """_unit_hash of each row of (n, 16) exact hashes."""
    return np.fromiter((_unit_hash(seed, h.tobytes()) for h in hashes), dtype=np.float64, count=len(hashes))


def _my_files(files: list[Path], rank: int, size: int) -> list[tuple[int, Path]]:
    """Rank's contiguous block of the sorted file list, cut where the byte count crosses r/N."""
    sizes = np.array([max(1, f.stat().st_size) for f in files], dtype=np.float64)
    starts = np.concatenate(([0.0], np.cumsum(sizes)[:-1])) / sizes.sum()
    owner = np.minimum((starts * size).astype(int), size - 1)
    return [(i, f) for i, f in enumerate(files) if owner[i] == rank]


def _input_files(comm, opts: PrepareOptions) -> list[Path]:
    with phase(comm):
        opts.validate()
        skipped = Skipped()
        files = preset_files(opts.preset) if opts.preset else resolve_inputs(opts.inputs, skipped)
        if comm.rank == 0 and skipped.by_reason:
            print(skipped.describe(), file=sys.stderr, flush=True)
        if opts.tokenizer not in ("bpe", "byte"):
            require_file(opts.tokenizer, "tokenizer file", " (or use --tokenizer bpe|byte)")
        out = Path(opts.out)
        require_writable_folder(out, "--out")
        if (out / shards.MANIFEST).exists() and not opts.overwrite:
            raise UserError(f"{out / shards.MANIFEST} exists: pass --overwrite to replace that dataset")
    return files


def run_prepare(opts: PrepareOptions) -> dict:
    """Run the whole pipeline on every rank of MPI_COMM_WORLD; returns the manifest on rank 0
    (and an empty dict elsewhere)."""
    comm = world()
    out = Path(opts.out)
    files = _input_files(comm, opts)
    threads = _set_tokenizer_threads(comm, opts.threads)
    name = None
    if comm.rank == 0:  # one name for every rank, even where a file's size or mtime looks different
        given = [Path(opts.tokenizer)] if opts.tokenizer not in ("bpe", "byte") else []  # its content too
        how = {k: v for k, v in opts.result_options().items() if k not in ("inputs", "preset")}
        name = fingerprint({**how, "chunk_mb": opts.chunk_mb}, files + given, comm.size)  # chunks name files
    name = comm.bcast(name, root=0)
    with phase(comm):
        build = build_folder.make_build_folder(comm, out, name)
    try:
        manifest = _build(comm, opts, files, build, overlap=threads > 1)
        with phase(comm):
            if comm.rank == 0:
                build_folder.move_into_place(build, out)
    except UserError:  # bad input or a full disk: nothing worth resuming
        if comm.rank == 0:
            shutil.rmtree(build, ignore_errors=True)
        raise
    if comm.rank == 0:
        shutil.rmtree(build, ignore_errors=True)
    return manifest


def _set_tokenizer_threads(comm, threads: int) -> int:
    """tokenizers encodes a batch on a rayon pool sized, when it first starts, by
    RAYON_NUM_THREADS: the node's cores shared by its ranks unless --threads says otherwise.
    Returns the count."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks_on_node = node.Get_size()
    node.Free()
    threads = threads or threads_per_rank(ranks_on_node)
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    return threads


def _build(comm, opts: PrepareOptions, files: list[Path], build: Path, overlap: bool) -> dict:
    """Every pass on this rank (``overlap``: tokenize on a thread beside the scan's hashing)."""
    rank = comm.rank
    phases = Phases(rank)
    with phase(comm):
        work = WorkFolder(build / ".work", rank)
    chunks = plan_chunks(_my_files(files, rank, comm.size), opts.chunk_mb * 1e6)
    my_bytes = sum(c.bytes for c in chunks)
    hasher = MinHasher(opts.num_perm, opts.shingle, opts.seed) if opts.near_dup_threshold > 0 else None

    with phase(comm), phases("tokenizer"):
        tok = _tokenizer(comm, opts, work, chunks)
    with phase(comm), phases("scan", my_bytes) as bar:
        markers = work.each_chunk("scan", chunks, lambda c: scan_chunk(work, c, opts, hasher, tok, overlap), bar)
    scan = load_scan(work, chunks, markers, hasher is not None)
    stats = scan.stats

    with phases("dedup"):
        numbering = Numbering(comm, scan.documents)
        exact = exact_duplicates(comm, scan.hashes, numbering)
        near = near_duplicates(comm, Sketches(scan.sketches, opts.num_perm), ~exact, numbering,
                               opts.near_dup_threshold) if hasher else np.zeros_like(exact)
        keep = ~(exact | near)
        stats["exact_duplicates"] = comm.allreduce(int(exact.sum()))
        stats["near_duplicates"] = comm.allreduce(int(near.sum()))
        kept_documents = comm.allreduce(int(keep.sum()))
    if not kept_documents:  # the same on every rank: a global count
        raise UserError(_empty_corpus(comm, opts, len(files), stats, markers))
    val = _val_documents(comm, opts, scan.hashes, keep, numbering)
    with_mask = bool(comm.allreduce(int(scan.has_prompt[keep].any())))

    with phase(comm), phases("split", my_bytes) as bar:
        firsts = np.cumsum([0] + [m["documents"] for m in markers])
        mine = lambda c: slice(firsts[c.index], firsts[c.index + 1])  # noqa: E731  the chunk's documents
        token_markers = work.each_chunk("split", chunks, lambda c: split_chunk(
            work, c, keep[mine(c)], val[mine(c)], scan.has_prompt[mine(c)], token_counts(work, c), with_mask), bar)
    for m in token_markers:
        for s in SPLITS:
            stats[f"{s}_docs"] += m["documents"][s]
            stats[f"{s}_tokens_in_stream"] += m["tokens"][s]

    with phases("pack"):
        entries = _pack(comm, opts, build, work, chunks, token_markers, tok, with_mask)
    return _finish(comm, opts, build, tok, with_mask, entries, stats, phases, scan.memory_bytes())


def _empty_corpus(comm, opts: PrepareOptions, files: int, stats: Counter, markers: list[dict]) -> str:
    """Why no document is left, with the text-field hint when records lacked the field."""
    no_field = comm.allreduce(stats.get("no_field", 0))
    seen = list(dict.fromkeys(name for part in comm.allgather([m.get("fields_seen", []) for m in markers])
                              for names in part for name in names))
    message = (f"empty corpus after cleaning: no document of {files} file(s) is left "
               f"(min_chars={opts.min_chars}, max_noise={opts.max_noise})")
    if no_field:
        message += f"; {no_field} record(s) have no {opts.text_field!r} field"
        if seen:
            message += f" (fields with text: {', '.join(seen)}): pass --text-field {seen[0]}"
    return message


def _val_documents(comm, opts: PrepareOptions, hashes: np.ndarray, keep: np.ndarray, numbering: Numbering):
    """(n,) bool: the kept documents that go to val, by a seeded hash of the content; at least
    one when val is asked for and there are two documents or more."""
    scores = _unit_hashes(opts.seed, hashes)
    val = keep & (scores < opts.val_fraction)
    kept = comm.allreduce(int(keep.sum()))
    if opts.val_fraction > 0 and kept > 1 and not comm.allreduce(int(val.any())):
        kept_scores = np.where(keep, scores, 2.0)
        at = int(np.argmin(kept_scores)) if len(kept_scores) else 0
        mine = (float(kept_scores[at]), numbering.first + at) if len(kept_scores) else (2.0, -1)
        lowest = min(comm.allgather(mine))  # (score, number): the lowest score, the first on a tie
        if numbering.first <= lowest[1] < numbering.first + numbering.count:
            val[lowest[1] - numbering.first] = True
    return val


def _tokenizer(comm, opts: PrepareOptions, work: WorkFolder, chunks: list[Chunk]):
    """byte, a file, or BPE trained on rank 0 (kept in the work folder, so a rerun does not
    train again) from a sample read first: the documents a seeded hash of the content picks,
    about --tokenizer-sample-mb of the input, less those the split sends to val and exact repeats."""
    if opts.tokenizer == "byte":
        return byte_tokenizer()
    if opts.tokenizer != "bpe":
        return load_tokenizer(opts.tokenizer)
    from tokenizers import Tokenizer

    saved = work.shared_path("tokenizer.json")
    text = saved.read_text(encoding="utf-8") if comm.rank == 0 and saved.is_file() else None
    trained = comm.bcast(text is None, root=0)
    if trained:
        input_bytes = comm.allreduce(sum(c.bytes for c in chunks)) or 1
        share = min(1.0, opts.tokenizer_sample_mb * 1e6 / input_bytes)
        with phase(comm):  # a file that fails here fails on its rank only: end every rank first
            mine = _sample(chunks, opts, share)
        picked = comm.gather(mine, root=0)
        if comm.rank == 0:
            sample = _sample_texts((pair for part in picked for pair in part), opts.tokenizer_sample_mb * 1e6)
            text = train_bpe(sample, opts.vocab_size).to_str()
    text = comm.bcast(text, root=0)
    if trained and comm.rank == 0:  # after the last collective: a full disk fails inside the phase
        with build_folder.writing(saved):
            write_text_atomic(saved, text)
    return Tokenizer.from_str(text)


def _sample(chunks: list[Chunk], opts: PrepareOptions, share: float) -> list[tuple[bytes, str]]:
    """(exact hash, text) of this rank's documents that the tokenizer sample takes."""
    picked = []
    for chunk in chunks:
        for doc in cleaned_documents(chunk.files, opts.text_field, opts.strict, opts.min_chars, opts.max_noise,
                                     ReadStats(), Counter()):
            digest = exact_hash(doc.text)
            if _unit_hash(opts.seed + 1, digest) < share and _unit_hash(opts.seed, digest) >= opts.val_fraction:
                picked.append((digest, doc.text))
    return picked


def _sample_texts(sample: Iterable[tuple[bytes, str]], limit_chars: float) -> Iterator[str]:
    """The sample's texts in order, each content once, until ``limit_chars`` (compressed input
    holds more text than its bytes on disk suggest)."""
    seen: set[bytes] = set()
    chars = 0
    for digest, text in sample:
        if digest not in seen and chars < limit_chars:
            seen.add(digest)
            chars += len(text)
            yield text


def _pack(comm, opts: PrepareOptions, build: Path, work: WorkFolder, chunks, token_markers, tok,
          with_mask: bool) -> list[dict]:
    """Write this rank's shards of each split into ``build``; returns their manifest entries.
    Every collective comes first, on every rank; the phase below holds local work only."""
    row = opts.seq_len + 1
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = shards.token_dtype(vocab_size)
    attrs = {"format_version": shards.FORMAT_VERSION, "seq_len": opts.seq_len, "vocab_size": vocab_size,
             "tokenizer_sha256": tokenizer_sha256(tok)}
    plans = {}
    for s in SPLITS:
        streams = [Stream(stream_files(work, chunks, token_markers, "tok", s), TOKEN_DTYPE)]
        if with_mask:
            streams.append(Stream(stream_files(work, chunks, token_markers, "mask", s), MASK_DTYPE))
        plan = ShardPlan(comm, streams[0].length, row, opts.samples_per_shard)
        plans[s] = plan, streams, exchange_heads(comm, plan, streams)
    if plans["train"][0].rows == 0:  # the same on every rank: a global count
        tokens = int(plans["train"][0].starts[-1])
        raise UserError(f"the training text has {tokens} tokens, fewer than one sample of --seq-len "
                        f"{opts.seq_len} + 1: add text or lower --seq-len")
    val_plan = plans["val"][0]
    if opts.val_fraction > 0 and val_plan.rows == 0 and comm.rank == 0:
        print(f"warning: the val split has {int(val_plan.starts[-1])} tokens, fewer than one sample of "
              f"--seq-len {opts.seq_len} + 1: training will have no evaluation and no early stopping; "
              "raise --val-fraction or lower --seq-len", file=sys.stderr, flush=True)
    entries = []
    with phase(comm):
        for s, (plan, streams, tails) in plans.items():
            def write(shard: int, pieces: list[np.ndarray], s=s) -> None:
                if len(pieces[0]) and int(pieces[0].max()) >= vocab_size:
                    raise UserError(f"{opts.tokenizer}: produced token id {int(pieces[0].max())} >= vocab size "
                                    f"{vocab_size}")
                name = f"{s}-{shard:05d}.h5"
                features = {"tokens": pieces[0].astype(dtype)}
                if with_mask:
                    features["loss_mask"] = pieces[1]
                with build_folder.writing(build / name):
                    digest = shards.write_shard(build / name, features, {**attrs, "split": s})
                entries.append({"file": name, "split": s, "samples": len(pieces[0]),
                                "tokens": int(pieces[0].size), "sha256": digest})

            write_shards(plan, streams, tails, row, write)
    return entries


def _finish(comm, opts: PrepareOptions, build: Path, tok, with_mask: bool, entries: list[dict], stats: Counter,
            phases: Phases, dedup_bytes: int) -> dict:
    """Gather the entries and stats on rank 0, which writes the tokenizer and the manifest."""
    gathered = comm.gather((entries, stats, phases.seconds, phases.peak_rss_mb, dedup_bytes), root=0)
    manifest: dict = {}
    with phase(comm):
        if comm.rank == 0:
            # Written as to_str() exactly, so the file's sha256 is the one in the manifest.
            with build_folder.writing(build / "tokenizer.json"):
                write_text_atomic(build / "tokenizer.json", tok.to_str())
            manifest = build_manifest(opts, comm.size, tok, with_mask, gathered)
            with build_folder.writing(build / shards.MANIFEST):
                write_json_atomic(build / shards.MANIFEST, manifest)
    return manifest
