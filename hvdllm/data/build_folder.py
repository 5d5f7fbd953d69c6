"""Where ``hvdllm prepare`` builds a dataset: a hidden folder inside ``--out``, moved into
place by renames only once complete, so a failure part way (a full disk) leaves the dataset
that was there intact and verifiable."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hvdllm.data import shards
from hvdllm.errors import UserError


def make_build_folder(comm, out: Path, name: str) -> Path:
    """The hidden folder ``.building-<name>`` inside ``out`` (the same file system, so moving the
    files into place is a rename and needs no space), made by rank 0. ``name`` fingerprints the
    arguments: a folder left by a killed run of the same arguments is found and continued."""
    build = out / f".building-{name}"
    error, resumed = None, False
    if comm.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            resumed = build.is_dir()
            build.mkdir(exist_ok=True)
        except OSError as err:
            error = f"--out {out}: cannot create a folder in it: {err.strerror or err}"
        if resumed:
            print(f"prepare: continuing the unfinished build in {build}", file=sys.stderr, flush=True)
        for other in sorted(out.glob(".building-*")):
            if other != build:  # a killed run of other arguments: its user decides
                print(f"prepare: note: {other} is an unfinished build of other arguments or inputs; "
                      "remove it to free its space", file=sys.stderr, flush=True)
    error = comm.bcast(error, root=0)
    if error:
        raise UserError(error)
    return build


def _old_dataset_files(out: Path) -> set[str]:
    """The files the dataset now in ``out`` consists of (none when there is no sound manifest)."""
    try:
        old = shards.read_manifest(out)
    except UserError:
        return set()
    return {e["file"] for e in old["shards"]} | {old["tokenizer"]["file"]}


def move_into_place(build: Path, out: Path) -> None:
    """Replace the dataset in ``out`` with the one in ``build``, renames only. The old manifest
    goes first and the new one comes last, so a manifest never lists a mix of old and new
    shards; files in ``out`` that are not part of the old dataset are left alone."""
    old_files = _old_dataset_files(out)
    try:
        (out / shards.MANIFEST).unlink(missing_ok=True)
        # Hidden entries (the work folder) are the build's own, not the dataset's.
        new_files = sorted(p.name for p in build.iterdir() if p.name != shards.MANIFEST and not p.name.startswith("."))
        for name in new_files:
            os.replace(build / name, out / name)
        for name in old_files - set(new_files):
            (out / name).unlink(missing_ok=True)
        os.replace(build / shards.MANIFEST, out / shards.MANIFEST)
    except OSError as err:
        raise UserError(f"--out {out}: cannot move the new dataset into place: {err.strerror or err}") from None


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write (a full disk, a quota) as one line naming the file."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{path}: cannot write: {err.strerror or err}") from None
