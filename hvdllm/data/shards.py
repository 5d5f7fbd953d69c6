"""The HDF5 shard format and its manifest (documented in data/FORMAT.md).

A shard holds fixed-shape per-sample arrays as HDF5 datasets with the sample as the first
axis, chunked by rows: ``tokens`` (N, seq_len + 1) for text, optionally ``loss_mask``, and
any other named features (image patches, audio frames) of a fixed per-sample shape.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from hvdllm.atomic import atomic_write
from hvdllm.errors import UserError
from hvdllm.paths import path_kind, require_file, require_folder

FORMAT_NAME = "hvdllm-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast reads, small for random access
# Attributes every shard repeats from the manifest, checked when it is opened.
SHARD_ATTRIBUTES = ("format_version", "seq_len", "vocab_size", "tokenizer_sha256")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def write_shard(path: str | Path, features: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> str:
    """Write one shard atomically; returns its sha256.

    Args:
        features: name -> array with the samples on axis 0; all the same length.
        attrs: file attributes (at least SHARD_ATTRIBUTES).
    """
    path = Path(path)
    lengths = {name: len(array) for name, array in features.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"features of {path.name} disagree on the number of samples: {lengths}")
    # The HDF5 image is built in memory and written with plain file I/O: libhdf5 handles a
    # failed write (a full disk) badly, leaving objects open that crash the process at exit.
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, array in features.items():
            row_bytes = array[0].nbytes if len(array) else array.dtype.itemsize
            chunk = (min(len(array), rows_per_chunk(row_bytes)) or 1,) + array.shape[1:]
            f.create_dataset(name, data=array, chunks=chunk if len(array) else None)
    data = image.getbuffer()
    with atomic_write(path) as out:
        out.write(data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder; a UserError naming the file when it is missing or bad."""
    folder = require_folder(folder, "data folder", " (run `hvdllm prepare` first)")
    path = folder / MANIFEST
    if path_kind(path) == "missing":
        raise UserError(f"{path}: no manifest (not a finished `hvdllm prepare` output)")
    require_file(path, "manifest")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: not an {FORMAT_NAME} v{FORMAT_VERSION} manifest "
                        f"(format {manifest.get('format')!r} v{manifest.get('format_version')!r})")
    _check_manifest_shape(manifest, path)
    require_file(folder / manifest["tokenizer"]["file"], "tokenizer", f" (listed in {path})")
    return manifest


# What each manifest field must be; checked once here so no reader meets a KeyError later.
_MANIFEST_FIELDS = {"seq_len": int, "vocab_size": int, "tokenizer": dict, "shards": list}
_TOKENIZER_FIELDS = {"file": str, "sha256": str}
_SHARD_FIELDS = {"file": str, "split": str, "samples": int, "tokens": int, "sha256": str}


def read_tokenizer_json(folder: str | Path, manifest: Mapping[str, Any]) -> str:
    """The tokenizer.json text a shard folder was made with (named in its manifest)."""
    return (Path(folder) / manifest["tokenizer"]["file"]).read_text()


def _check_fields(record: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where} must be a JSON object, not {type(record).__name__}")
    for key, kind in fields.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")


def _check_manifest_shape(manifest: dict, path: Path) -> None:
    _check_fields(manifest, _MANIFEST_FIELDS, f"{path}")
    _check_fields(manifest["tokenizer"], _TOKENIZER_FIELDS, f"{path}: tokenizer")
    for i, entry in enumerate(manifest["shards"]):
        _check_fields(entry, _SHARD_FIELDS, f"{path}: shards[{i}]")
        if Path(entry["file"]).name != entry["file"]:
            raise UserError(f"{path}: shards[{i}]: file {entry['file']!r} must be a name inside the folder")
    if manifest["seq_len"] < 1 or manifest["vocab_size"] < 1:
        raise UserError(f"{path}: seq_len and vocab_size must be >= 1")


def open_shard(path: str | Path, manifest: Mapping[str, Any]) -> h5py.File:
    """Open a shard read-only and check that it agrees with the manifest."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: shard listed in the manifest is missing")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 shard (truncated or corrupt): {err}") from None
    try:
        _check_declared_sizes(f, path)
    except UserError:
        f.close()
        raise
    expected = {"format_version": FORMAT_VERSION, "seq_len": manifest["seq_len"],
                "vocab_size": manifest["vocab_size"], "tokenizer_sha256": manifest["tokenizer"]["sha256"]}
    for key, want in expected.items():
        have = f.attrs.get(key)
        have = have.item() if isinstance(have, np.generic) else have
        if have != want:
            f.close()
            raise UserError(f"{path}: {key} is {have!r} but the manifest says {want!r}")
    if "tokens" not in f or f["tokens"].ndim != 2 or f["tokens"].shape[1] != manifest["seq_len"] + 1:
        f.close()
        raise UserError(f"{path}: no dataset 'tokens' of shape (N, {manifest['seq_len'] + 1})")
    return f


def _check_declared_sizes(f: h5py.File, path: Path) -> None:
    """Every dataset fits in the file, as write_shard's uncompressed ones do: a corrupt or
    forged header declaring (10**12, 33) would otherwise be believed by every reader (an index
    of 10**12 samples, a read of the whole dataset) and end in a MemoryError naming nothing."""
    size = path.stat().st_size
    for name, dataset in f.items():
        if not isinstance(dataset, h5py.Dataset) or dataset.compression is not None:
            continue
        declared = int(np.prod(dataset.shape, dtype=object)) * dataset.dtype.itemsize
        if declared > size:
            raise UserError(f"{path}: dataset {name!r} declares shape {dataset.shape} ({declared:,} bytes) in a file "
                            f"of {size:,} bytes: a corrupt shard header")


def verify_folder(folder: str | Path, check_tokens: bool = True) -> list[str]:
    """Every problem of a shard folder as one line each, naming the file; empty when sound."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except UserError as err:
        return [str(err)]
    problems = []
    if not any(e["split"] == "train" and e["samples"] > 0 for e in manifest["shards"]):
        problems.append(f"{folder / MANIFEST}: no training samples (an empty dataset)")
    tokenizer = folder / manifest["tokenizer"]["file"]
    if not tokenizer.is_file():
        problems.append(f"{tokenizer}: tokenizer listed in the manifest is missing")
    elif file_sha256(tokenizer) != manifest["tokenizer"]["sha256"]:
        problems.append(f"{tokenizer}: sha256 does not match the manifest")
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        try:
            with open_shard(path, manifest) as f:
                if len(f["tokens"]) != entry["samples"]:
                    raise UserError(f"{path}: {len(f['tokens'])} samples but the manifest says {entry['samples']}")
                if check_tokens and len(f["tokens"]):
                    top = int(np.max(f["tokens"][...]))
                    if top >= manifest["vocab_size"]:
                        raise UserError(f"{path}: token id {top} >= vocab size {manifest['vocab_size']}")
            if file_sha256(path) != entry["sha256"]:
                raise UserError(f"{path}: sha256 does not match the manifest")
        except UserError as err:
            problems.append(str(err))
        except OSError as err:  # an HDF5 read error inside a damaged file
            problems.append(f"{path}: unreadable: {err}")
    return problems
