"""The pass over a rank's input, chunk by chunk (scan): each cleaned document is hashed for
deduplication and tokenized, and only what deduplication needs stays in memory.

Per document the scan keeps 25 bytes in memory (its exact hash, its length, whether it has a
prompt) and writes its MinHash signature, its shingle hashes (to verify candidate pairs
exactly) and its tokens to the chunk's files: text is held for two encode batches at most, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from hvdllm.data.clean import cleaned_documents
from hvdllm.data.dedup import MinHasher, exact_hash, shingle_hashes
from hvdllm.data.encode import ChunkEncoder
from hvdllm.data.sources import ReadStats
from hvdllm.data.work import Chunk, WorkFolder, append, read_rows

SIGNATURE_DTYPE = np.dtype(np.uint32)
SKETCH_SHINGLES = 1 << 18  # shingles hashed at once: 2 MB of hashes, a few MB of temporaries


@dataclass
class ScanResult:
    """What deduplication, the split and the tokenizer sample need of a rank's documents."""
    hashes: np.ndarray  # (n, 16) uint8: exact_hash of each document
    chars: np.ndarray  # (n,) int64
    has_prompt: np.ndarray  # (n,) bool
    sketches: list  # per chunk: ChunkSketches, or [] without near-dedup
    stats: Counter

    @property
    def documents(self) -> int:
        return len(self.chars)

    def memory_bytes(self) -> int:
        return self.hashes.nbytes + self.chars.nbytes + self.has_prompt.nbytes


def scan_chunk(work: WorkFolder, chunk: Chunk, opts, hasher: MinHasher | None, tok, overlap: bool) -> dict:
    """Scan one chunk: writes its hashes, signatures, shingle sets and every document's tokens
    (encoded on tokenizers' threads meanwhile when ``overlap``); returns its marker."""
    read, dropped = ReadStats(), Counter()
    hashes, chars, prompts, shingle_counts = [], [], [], []
    with ExitStack() as files:
        signatures, sets, tokens, masks = (files.enter_context(work.spill(kind, chunk.index, suffix)) for kind, suffix
                                           in (("sig", ".u32"), ("shingles", ".u64"), ("all", ".tok"), ("all", ".mask")))
        encoder = files.enter_context(ChunkEncoder(tok, tokens, masks, overlap))
        sketcher = SketchWriter(hasher, signatures, sets) if hasher is not None else None
        for doc in cleaned_documents(chunk.files, opts.text_field, opts.strict, opts.min_chars, opts.max_noise,
                                     read, dropped):
            encoder.add(doc)
            hashes.append(exact_hash(doc.text))
            chars.append(len(doc.text))
            prompts.append(doc.prompt_chars > 0)
            if sketcher is not None:
                shingle_counts.append(sketcher.add(doc.text))
        if sketcher is not None:
            sketcher.flush()
        token_counts = encoder.finish()
    with work.spill("scan", chunk.index, ".npz") as out:
        np.savez(out, hashes=np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 16),
                 chars=np.asarray(chars, dtype=np.int64), has_prompt=np.asarray(prompts, dtype=bool),
                 shingle_counts=np.asarray(shingle_counts, dtype=np.int64), token_counts=token_counts)
    if read.not_text_at:  # one write: ranks must not interleave
        more = ", ..." if read.not_text > len(read.not_text_at) else ""
        print(f"warning: {read.not_text} record(s) whose {opts.text_field!r} is not text, skipped: "
              f"{', '.join(read.not_text_at)}{more}", file=sys.stderr, flush=True)
    return {"documents": len(chars), "stats": dict(read.counts()) | dict(dropped), "fields_seen": read.fields_seen}


class SketchWriter:
    """Writes documents' MinHash signatures and shingle sets, hashing SKETCH_SHINGLES shingles
    at a time: the signatures of many documents cost a few numpy calls."""

    def __init__(self, hasher: MinHasher, signatures: IO[bytes], sets: IO[bytes]) -> None:
        self.hasher, self.signatures, self.sets = hasher, signatures, sets
        self.pending: list[np.ndarray] = []
        self.shingles = 0

    def add(self, text: str) -> int:
        """Queue one document; returns how many distinct shingles it has."""
        shingles = shingle_hashes(text, self.hasher.shingle)
        self.pending.append(shingles)
        self.shingles += len(shingles)
        if self.shingles >= SKETCH_SHINGLES:
            self.flush()
        return len(shingles)

    def flush(self) -> None:
        if self.pending:
            append(self.signatures, self.hasher.signatures(self.pending).astype(SIGNATURE_DTYPE))
            append(self.sets, np.concatenate(self.pending))
        self.pending, self.shingles = [], 0


def token_counts(work: WorkFolder, chunk: Chunk) -> np.ndarray:
    """Each of the chunk's documents' token count (EOS included), from its scan."""
    with np.load(work.path("scan", chunk.index, ".npz")) as arrays:
        return arrays["token_counts"]


def load_scan(work: WorkFolder, chunks: list[Chunk], markers: list[dict], near_dedup: bool) -> ScanResult:
    stats: Counter = Counter()
    parts = []
    for chunk, marker in zip(chunks, markers):
        stats.update(marker["stats"])
        with np.load(work.path("scan", chunk.index, ".npz")) as arrays:
            parts.append({name: arrays[name] for name in ("hashes", "chars", "has_prompt")})
    join = lambda name, empty: np.concatenate([p[name] for p in parts]) if parts else empty  # noqa: E731
    files = [ChunkSketches(work.path("sig", c.index, ".u32"), work.path("shingles", c.index, ".u64"),
                           work.path("scan", c.index, ".npz"), m["documents"]) for c, m in zip(chunks, markers)] \
        if near_dedup else []
    return ScanResult(join("hashes", np.zeros((0, 16), np.uint8)), join("chars", np.zeros(0, np.int64)),
                      join("has_prompt", np.zeros(0, bool)), files, stats)


@dataclass(frozen=True)
class ChunkSketches:
    """Where one chunk's signatures and shingle sets are."""
    signatures: Path  # (documents, num_perm) uint32, row-major
    shingles: Path  # every document's sorted unique shingle hashes, one after another
    counts: Path  # the scan's npz, whose shingle_counts say how many are each document's
    documents: int


class Sketches:
    """A rank's MinHash signatures and shingle sets, read from its chunks' files as needed."""

    def __init__(self, chunks: list[ChunkSketches], num_perm: int) -> None:
        self.chunks = chunks
        self.num_perm = num_perm
        self.starts = np.cumsum([0] + [c.documents for c in chunks])

    def signature_blocks(self, rows_per_block: int = 8192) -> Iterator[np.ndarray]:
        for chunk in self.chunks:
            for first in range(0, chunk.documents, rows_per_block):
                yield read_rows(chunk.signatures, SIGNATURE_DTYPE, self.num_perm, first,
                                min(rows_per_block, chunk.documents - first))

    def shingle_sets(self, local: np.ndarray) -> list[np.ndarray]:
        """The shingle hashes of the documents at these local indices, in that order."""
        out: list = [None] * len(local)
        which = np.searchsorted(self.starts, local, side="right") - 1
        for chunk_index in np.unique(which):
            chunk = self.chunks[chunk_index]
            with np.load(chunk.counts) as arrays:
                offsets = np.concatenate(([0], np.cumsum(arrays["shingle_counts"])))
            for at in np.flatnonzero(which == chunk_index):
                row = local[at] - self.starts[chunk_index]
                out[at] = np.fromfile(chunk.shingles, dtype=np.uint64, count=offsets[row + 1] - offsets[row],
                                      offset=offsets[row] * 8)
        return out
