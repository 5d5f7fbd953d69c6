"""Atomic file writes: a reader sees the old file or the whole new one, never a part of it.

Everything is written under a hidden temporary name in the target's own folder (a rename is
atomic only within one file system), fsynced so the data is on disk before the name points
at it, then renamed over the target. When anything fails before the rename (a full disk, an
exception in the caller's block) the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _fresh_temp(path: Path) -> Path:
    # Hidden and not ending in the target's suffix, so no listing or *.pt / *.h5 glob picks
    # it up; the pid keeps concurrent writers apart. A leftover from a killed writer with the
    # same pid (common in containers) is removed, or os.link onto it would fail.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    return tmp


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to create ``path`` through, for writers that want a file name
    (h5py, savefig, os.link); on a clean exit it is fsynced and renamed over ``path``.

    The writer must not infer the format from the temporary name's suffix (pass
    ``format="png"`` to savefig).
    """
    path = Path(path)
    tmp = _fresh_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a file object open on a temporary name; on a clean exit it is flushed, fsynced
    and renamed over ``path``.

    Args:
        mode: "wb" or "w" (text; ``encoding`` applies). Appending makes no sense here: the
            temporary file starts empty.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = _fresh_temp(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
