"""The work folder of one ``hvdllm prepare``: what each rank has finished, chunk by chunk.

A rank's input files are cut into chunks of whole files (about ``--chunk-mb`` each). Every
pass over the input writes one set of files per chunk, each under a temporary name renamed
when complete, and then a small JSON marker saying the chunk is done. A prepare killed at any
moment and run again with the same arguments finds the same folder (its name is a fingerprint
of the arguments, the input files and the number of ranks) and skips the chunks whose marker
is there; everything it computes from them is deterministic, so the result is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from hvdllm.atomic import atomic_write, write_json_atomic
from hvdllm.data.build_folder import writing

# Bumped whenever what a chunk's files hold changes, so an older unfinished build is not reused.
WORK_FORMAT = 4


def fingerprint(options: dict, files: list[Path], ranks: int) -> str:
    """Names one prepare: the same options, the same input files (path, size, mtime) and the
    same number of ranks give the same name, any change a new one."""
    described = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps([WORK_FORMAT, options, described, ranks], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Chunk:
    index: int
    files: tuple[tuple[int, Path], ...]  # (index in the global sorted file list, path)
    bytes: int  # on disk


def plan_chunks(my_files: list[tuple[int, Path]], chunk_bytes: float) -> list[Chunk]:
    """Consecutive whole files, a chunk closed once it holds ``chunk_bytes`` (a file larger
    than that is a chunk of its own)."""
    chunks, current, size = [], [], 0
    for index, path in my_files:
        current.append((index, path))
        size += path.stat().st_size
        if size >= chunk_bytes:
            chunks.append(Chunk(len(chunks), tuple(current), size))
            current, size = [], 0
    if current:
        chunks.append(Chunk(len(chunks), tuple(current), size))
    return chunks


class WorkFolder:
    """One rank's view of the work folder: its chunk files and their done markers."""

    def __init__(self, root: Path, rank: int) -> None:
        self.root = root
        self.rank = rank
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, chunk: int, suffix: str) -> Path:
        return self.root / f"{kind}-r{self.rank:05d}-c{chunk:06d}{suffix}"

    def shared_path(self, name: str) -> Path:
        """A file every rank reads (written by one)."""
        return self.root / name

    def done(self, kind: str, chunk: int) -> dict | None:
        """The marker of a finished chunk of this pass, or None."""
        marker = self.path(kind, chunk, ".done.json")
        try:
            return json.loads(marker.read_text())
        except (OSError, ValueError):
            return None

    def mark_done(self, kind: str, chunk: int, info: dict) -> None:
        marker = self.path(kind, chunk, ".done.json")
        with writing(marker):
            write_json_atomic(marker, info)

    def each_chunk(self, kind: str, chunks: list[Chunk], run: Callable[[Chunk], dict], progress) -> list[dict]:
        """``run`` each chunk this pass has not finished (its result is the chunk's marker);
        returns every chunk's marker. ``progress`` advances by each chunk's bytes and documents."""
        markers, reused = [], 0
        for chunk in chunks:
            marker = self.done(kind, chunk.index)
            if marker is None:
                marker = run(chunk)
                self.mark_done(kind, chunk.index, marker)
            else:
                reused += 1
            progress.advance(chunk.bytes, _documents(marker))
            markers.append(marker)
        if reused:
            print(f"prepare: {kind}: {reused} of {len(chunks)} chunks were done (rank {self.rank})",
                  file=sys.stderr, flush=True)
        return markers

    @contextmanager
    def spill(self, kind: str, chunk: int, suffix: str) -> Iterator[IO[bytes]]:
        """A file written piece by piece and renamed into place when the block ends."""
        path = self.path(kind, chunk, suffix)
        with writing(path), atomic_write(path) as out:
            yield out


def _documents(marker: dict) -> int:
    """A marker's document count: a number (scan) or one per split (tokenize)."""
    documents = marker.get("documents", 0)
    return sum(documents.values()) if isinstance(documents, dict) else documents


def append(out: IO[bytes], array: np.ndarray) -> None:
    out.write(np.ascontiguousarray(array).tobytes())


def read_rows(path: Path, dtype: np.dtype, row_width: int, first: int, count: int) -> np.ndarray:
    """Rows [first, first + count) of a raw row-major file of ``row_width`` values per row."""
    itemsize = np.dtype(dtype).itemsize
    flat = np.fromfile(path, dtype=dtype, count=count * row_width, offset=first * row_width * itemsize)
    return flat.reshape(-1, row_width)
