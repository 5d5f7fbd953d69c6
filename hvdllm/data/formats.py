"""How one input file is read, streaming: plain, gzip or zstd text and JSONL a chunk at a
time, Parquet and Arrow IPC a batch at a time (a row group of the needed columns, or a record
batch as written), and the folders Hugging Face ``datasets`` writes with ``save_to_disk``.
No record file is held whole in memory, nothing is written, and every failure is a UserError
naming the file.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from hvdllm.errors import UserError, first_line

CHUNK_BYTES = 1 << 20
ROWS_PER_BATCH = 1024  # table rows turned into Python objects at a time: bounded memory for long documents
COMPRESSED_SUFFIXES = (".gz", ".zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
ARROW_FILE_MAGIC = b"ARROW1"  # the random-access IPC file format; save_to_disk writes the stream format


def is_jsonl(path: Path) -> bool:
    """a.jsonl, a.jsonl.gz, a.jsonl.zst."""
    return path.name.endswith(tuple(".jsonl" + suffix for suffix in ("", *COMPRESSED_SUFFIXES)))


def is_table(path: Path) -> bool:
    return path.name.endswith(TABLE_SUFFIXES)


# --- bytes and lines ---------------------------------------------------------------------------

def _zstd_chunks(raw: BinaryIO, path: Path) -> Iterator[bytes]:
    """Decompressed chunks of every zstd frame in ``raw``. A decompressobj, not stream_reader:
    stream_reader ends quietly at a file cut inside a frame, and a cut file must not pass as whole."""
    decompressor = zstandard.ZstdDecompressor()
    frame, inside_frame = decompressor.decompressobj(), False
    while chunk := raw.read(CHUNK_BYTES):
        while chunk:
            yield frame.decompress(chunk)
            inside_frame, chunk = not frame.eof, b""
            if frame.eof:  # another frame may follow (multi-threaded zstd and pzstd write several)
                chunk, frame = frame.unused_data, decompressor.decompressobj()
    if inside_frame:
        raise UserError(f"{path}: truncated or corrupt zstd file: it ends inside a frame")


def _raw_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        if path.name.endswith(".zst"):
            yield from _zstd_chunks(raw, path)
            return
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk


def byte_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed when it ends in .gz or .zst, a chunk at a time."""
    try:
        yield from _raw_chunks(path)
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as err:
        kind = "zstd" if path.name.endswith(".zst") else "gzip"
        raise UserError(f"{path}: truncated or corrupt {kind} file: {first_line(err)}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or first_line(err)}") from None


def _split_lines(piece: bytes) -> list[bytes]:
    """One "\\n"-terminated piece as the lines bytes.splitlines would make of it, so a file of
    bare "\\r" line ends is numbered as if it had been read whole."""
    return piece.splitlines() if b"\r" in piece else [piece]


def lines(path: Path) -> Iterator[bytes]:
    """The file's lines without their line ends, streaming (a chunk of the file in memory)."""
    pending: list[bytes] = []  # the chunks of a line not ended yet: joined once, however long it grows
    for chunk in byte_chunks(path):
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        pieces = b"".join([*pending, chunk]).split(b"\n")
        pending = [pieces.pop()]
        for piece in pieces:
            yield from _split_lines(piece)
    tail = b"".join(pending)
    if tail:
        yield from _split_lines(tail)


def read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of the (decompressed) file."""
    head = b""
    for chunk in byte_chunks(path):
        head += chunk
        if len(head) >= size:
            break
    return head[:size]


# --- tables: Parquet and Arrow IPC -------------------------------------------------------------

def _schema_has(schema: pa.Schema, name: str) -> bool:
    """A top-level column ``name``, or a path of struct fields "a.b.c" in ``schema``."""
    if name in schema.names:
        return True
    field_type = pa.struct(list(schema))
    for part in name.split("."):
        if not pa.types.is_struct(field_type) or field_type.get_field_index(part) < 0:
            return False
        field_type = field_type.field(part).type
    return True


def _parquet_batches(path: Path, choose_columns: Callable[[pa.Schema], list[str]]) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(path) as parquet:
        # A dotted name reads just that leaf of a struct column (or the column of that literal name).
        columns = choose_columns(parquet.schema_arrow)
        yield from parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns)


def _arrow_batches(path: Path, choose_columns: Callable[[pa.Schema], list[str]]) -> Iterator[pa.RecordBatch]:
    with pa.OSFile(str(path)) as source:
        is_file_format = source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
        source.seek(0)
        reader = pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source)
        # Arrow selects whole top-level columns: a struct's root for a dotted name.
        roots = [name if name in reader.schema.names else name.split(".")[0]
                 for name in choose_columns(reader.schema)]
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file_format else reader
        for batch in batches:
            yield batch.select(roots)


def table_rows(path: Path, text_field: str, record_fields: tuple[str, ...]) -> Iterator[dict]:
    """The rows of a Parquet or Arrow IPC file as dicts holding only ``text_field`` (a column,
    or a dotted path into struct columns) and those of ``record_fields`` the file has.

    Raises UserError naming the file and its columns when it has neither ``text_field`` nor
    all of ``record_fields``.
    """
    def choose_columns(schema: pa.Schema) -> list[str]:
        has_text = _schema_has(schema, text_field)
        present = [name for name in record_fields if name in schema.names]
        if not has_text and len(present) < len(record_fields):
            raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
        return ([text_field] if has_text else []) + present

    is_parquet = path.name.endswith(".parquet")
    try:
        for batch in (_parquet_batches if is_parquet else _arrow_batches)(path, choose_columns):
            for start in range(0, batch.num_rows, ROWS_PER_BATCH):
                yield from batch.slice(start, ROWS_PER_BATCH).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable {'Parquet' if is_parquet else 'Arrow IPC'} file: "
                        f"{first_line(err)}") from None


# --- Hugging Face datasets folders -------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read: {first_line(err)}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a folder written by ``datasets``' ``Dataset.save_to_disk``, in its
    state.json's order; None when ``folder`` is not one.

    save_to_disk names them data-00000-of-0000N.arrow, so name order is state.json's order and
    they keep it in the sorted input list; a state.json that lists them otherwise is refused
    rather than read in an order it does not say. A DatasetDict (a folder of splits) is refused
    with the splits named: which splits belong in a training corpus is the user's choice.
    """
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits")
        splits = splits if isinstance(splits, list) else []
        example = f", e.g. {folder / str(splits[0])}" if splits else ""
        raise UserError(f"{folder} is a Hugging Face DatasetDict (splits: {', '.join(map(str, splits))}): "
                        f"name the folder of each split to read{example}")
    if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        return None
    state_path = folder / "state.json"
    state = _read_json(state_path)
    if state.get("_indices_data_files"):
        raise UserError(f"{state_path}: the dataset has an indices mapping (saved by datasets < 2.0): "
                        f"save a flattened copy with a newer datasets")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise UserError(f"{state_path}: no _data_files list of {{\"filename\": ...}} entries")
    files = [folder / entry["filename"] for entry in entries]
    for path in files:
        if not path.is_file():
            raise UserError(f"{state_path} lists {path.name}, which is not a file in {folder}")
    if files != sorted(files):
        raise UserError(f"{state_path} lists its data files out of name order: rename them so that "
                        f"name order is the dataset's order")
    return files
