"""The second pass over a rank's input: the kept documents, tokenized in batches by
``tokenizers``' own threads, appended to each split's token stream (and loss-mask stream)
in the chunk's files."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import numpy as np

from hvdllm.data.scan import cleaned_documents
from hvdllm.data.sources import ReadStats
from hvdllm.data.tokenizer import eos_id
from hvdllm.data.work import Chunk, WorkFolder, append

SPLITS = ("train", "val")
TOKEN_DTYPE = np.dtype(np.uint32)
MASK_DTYPE = np.dtype(np.uint8)
BATCH_CHARS = 1 << 20  # text handed to encode_batch at once: enough to keep its threads busy


def stream_files(work: WorkFolder, chunks: list[Chunk], markers: list[dict], kind: str, split: str):
    """(path, length) of a split's stream ("tok" or "mask") in each chunk, in order."""
    return [(work.path(kind, c.index, f".{split}"), m["tokens"][split]) for c, m in zip(chunks, markers)]


def tokenize_chunk(work: WorkFolder, chunk: Chunk, opts, tok, keep: np.ndarray, val: np.ndarray,
                   with_mask: bool) -> dict:
    """Tokenize one chunk's kept documents; returns its marker.

    Args:
        keep, val: (documents in the chunk,) bool, from deduplication and the split.
    """
    eos = eos_id(tok)
    tokens, documents = Counter(), Counter()
    with ExitStack() as files:
        out = {(kind, s): files.enter_context(work.spill(kind, chunk.index, f".{s}"))
               for kind in (("tok", "mask") if with_mask else ("tok",)) for s in SPLITS}
        batch: list = []

        # Offsets are needed only to mask prompts; encode_batch_fast skips computing them.
        encode = tok.encode_batch if with_mask else tok.encode_batch_fast

        def flush() -> None:
            for (doc, split), encoding in zip(batch, encode([d.text for d, _ in batch])):
                append(out["tok", split], np.asarray(encoding.ids + [eos], dtype=TOKEN_DTYPE))
                if with_mask:  # a token is learned from when it starts inside the completion (EOS always)
                    starts = np.asarray([o[0] for o in encoding.offsets] + [len(doc.text)], dtype=np.int64)
                    append(out["mask", split], (starts >= doc.prompt_chars).astype(MASK_DTYPE))
                tokens[split] += len(encoding.ids) + 1
                documents[split] += 1
            batch.clear()

        chars = 0
        documents_in_chunk = cleaned_documents(chunk, opts.text_field, opts.strict, opts.min_chars,
                                               opts.max_noise, ReadStats(), Counter())
        for i, doc in enumerate(documents_in_chunk):
            if keep[i]:
                batch.append((doc, "val" if val[i] else "train"))
                chars += len(doc.text)
            if chars >= BATCH_CHARS:
                flush()
                chars = 0
        flush()
    return {"tokens": {s: tokens[s] for s in SPLITS}, "documents": {s: documents[s] for s in SPLITS}}


def sample_texts(chunks: list[Chunk], opts, chosen: np.ndarray) -> list[str]:
    """The texts of the chosen documents (a (documents,) bool over all the rank's chunks), read
    again from the input: only chunks holding one are read."""
    texts, first = [], 0
    for chunk, count in chunks:
        if chosen[first:first + count].any():
            documents = cleaned_documents(chunk, opts.text_field, opts.strict, opts.min_chars, opts.max_noise,
                                          ReadStats(), Counter())
            texts.extend(doc.text for i, doc in enumerate(documents) if chosen[first + i])
        first += count
    return texts
