"""Tokens: every cleaned document of a chunk is tokenized while the scan reads it (``ChunkEncoder``),
and once deduplication and the split are known the kept documents' tokens are copied into each
split's stream (``split_chunk``), which packing reads."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import IO

import numpy as np

from hvdllm.data.sources import Document
from hvdllm.data.tokenizer import eos_id
from hvdllm.data.work import Chunk, WorkFolder, append

SPLITS = ("train", "val")
TOKEN_DTYPE = np.dtype(np.uint32)
MASK_DTYPE = np.dtype(np.uint8)
BATCH_CHARS = 1 << 20  # text handed to encode_batch at once: enough to keep its threads busy
COPY_TOKENS = 1 << 22  # tokens split_chunk reads at a time


class ChunkEncoder:
    """Tokenizes documents on a background thread while the caller reads and hashes the next
    ones: ``encode_batch`` runs on tokenizers' own threads and releases the GIL. Every
    document's tokens (and EOS) go to ``tokens`` in order; a document with a prompt also has
    its loss mask written to ``masks``. One batch is encoded while the next fills, so memory
    holds two batches at most. Use it as a context manager around the files' lifetime."""

    def __init__(self, tok, tokens: IO[bytes], masks: IO[bytes], overlap: bool = True) -> None:
        self.tok, self.tokens, self.masks = tok, tokens, masks
        self.eos = eos_id(tok)
        self.batch: list[Document] = []
        self.chars = 0
        self.counts: list[int] = []
        # Without overlap (one thread per rank, as --threads 1 asks) batches are encoded inline.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") if overlap else None
        self.pending: Future | None = None

    def add(self, doc: Document) -> None:
        self.batch.append(doc)
        self.chars += len(doc.text)
        if self.chars >= BATCH_CHARS:
            self._submit()

    def __enter__(self) -> ChunkEncoder:
        return self

    def __exit__(self, *error) -> None:
        if self.pool is not None:  # on an error in the caller the batch in flight ends before its files close
            self.pool.shutdown(wait=True)

    def finish(self) -> np.ndarray:
        """Wait for the last batch; returns each document's token count (EOS included)."""
        self._submit()
        self._wait()
        return np.asarray(self.counts, dtype=np.int64)

    def _submit(self) -> None:
        self._wait()
        if self.batch and self.pool is None:
            self._encode(self.batch)
        elif self.batch:
            self.pending = self.pool.submit(self._encode, self.batch)
        self.batch, self.chars = [], 0

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises the thread's error here
            self.pending = None

    def _encode(self, batch: list[Document]) -> None:
        # Offsets are needed only to mask prompts; encode_batch_fast skips computing them.
        prompts = any(doc.prompt_chars for doc in batch)
        encode = self.tok.encode_batch if prompts else self.tok.encode_batch_fast
        for doc, encoding in zip(batch, encode([doc.text for doc in batch])):
            append(self.tokens, np.asarray(encoding.ids + [self.eos], dtype=TOKEN_DTYPE))
            if doc.prompt_chars:  # a token is learned from when it starts inside the completion (EOS always)
                starts = np.asarray([o[0] for o in encoding.offsets] + [len(doc.text)], dtype=np.int64)
                append(self.masks, (starts >= doc.prompt_chars).astype(MASK_DTYPE))
            self.counts.append(len(encoding.ids) + 1)


def stream_files(work: WorkFolder, chunks: list[Chunk], markers: list[dict], kind: str, split: str):
    """(path, length) of a split's stream ("tok" or "mask") in each chunk, in order."""
    return [(work.path(kind, c.index, f".{split}"), m["tokens"][split]) for c, m in zip(chunks, markers)]


def split_chunk(work: WorkFolder, chunk: Chunk, keep: np.ndarray, val: np.ndarray, has_prompt: np.ndarray,
                counts: np.ndarray, with_mask: bool) -> dict:
    """Copy the chunk's kept documents' tokens (and loss masks: ones for a document without a
    prompt) into each split's stream files; returns the chunk's marker. Reads the chunk's
    tokens COPY_TOKENS at a time.

    Args:
        keep, val, has_prompt: (documents,) bool; counts: (documents,) tokens of each.
    """
    starts = np.concatenate(([0], np.cumsum(counts)))
    mask_starts = np.concatenate(([0], np.cumsum(np.where(has_prompt, counts, 0))))
    tokens, documents = Counter(), Counter()
    with ExitStack() as files:
        out = {(kind, s): files.enter_context(work.spill(kind, chunk.index, f".{s}"))
               for kind in (("tok", "mask") if with_mask else ("tok",)) for s in SPLITS}
        first = 0
        while first < len(counts):
            last = max(first + 1, int(np.searchsorted(starts, starts[first] + COPY_TOKENS, side="right")) - 1)
            last = min(last, len(counts))
            block = _read(work.path("all", chunk.index, ".tok"), TOKEN_DTYPE, starts[first], starts[last])
            masks = _read(work.path("all", chunk.index, ".mask"), MASK_DTYPE, mask_starts[first],
                          mask_starts[last]) if with_mask else None
            for doc in np.flatnonzero(keep[first:last]) + first:
                split = "val" if val[doc] else "train"
                append(out["tok", split], block[starts[doc] - starts[first]:starts[doc + 1] - starts[first]])
                if with_mask:
                    mask = masks[mask_starts[doc] - mask_starts[first]:mask_starts[doc + 1] - mask_starts[first]] \
                        if has_prompt[doc] else np.ones(counts[doc], dtype=MASK_DTYPE)
                    append(out["mask", split], mask)
                tokens[split] += int(counts[doc])
                documents[split] += 1
            first = last
    return {"tokens": {s: tokens[s] for s in SPLITS}, "documents": {s: documents[s] for s in SPLITS}}


def _read(path, dtype: np.dtype, begin: int, end: int) -> np.ndarray:
    return np.fromfile(path, dtype=dtype, count=int(end - begin), offset=int(begin) * dtype.itemsize)
