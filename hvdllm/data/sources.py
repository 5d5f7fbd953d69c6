"""Where documents come from: files, folders and globs of text, JSONL, Parquet and Arrow
(plain, .gz or .zst), folders saved by Hugging Face ``datasets``, or a built-in preset.

A document is a :class:`Document` with a stable key (file index, record index) that orders
the whole corpus the same way whatever the number of ranks reading it. How each format is
read, streaming, is in :mod:`hvdllm.data.formats`.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from hvdllm.data.formats import byte_chunks, is_jsonl, is_table, lines, read_head, saved_dataset_files, table_rows
from hvdllm.errors import UserError
from hvdllm.paths import path_kind

# Read in folders whatever their content looks like; other files are read when it is text.
KNOWN_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
PRESETS = ("python-stdlib",)
# A record with these two string fields is instruction data, whatever the text field (see read_documents).
PROMPT_FIELDS = ("prompt", "completion")


@dataclass
class Document:
    # (file index in the sorted input list, record index in the file): 0 for a whole-file
    # document, else the record's line number in JSONL or row number in a table, from 1
    key: tuple[int, int]
    text: str
    prompt_chars: int = 0  # instruction data: the first prompt_chars characters are the prompt


@dataclass
class ReadStats:
    files: int = 0
    bytes: int = 0
    records: int = 0
    replaced_bytes: int = 0  # undecodable bytes replaced with U+FFFD
    bad_json_lines: int = 0
    missing_text: int = 0  # records with a missing or empty text field
    not_text: int = 0  # records whose text field is a number, a list, an object or null
    not_text_at: list[str] = field(default_factory=list)  # the first few of them, as "path:line (type)"
    no_field: int = 0  # records without the text field at all (part of missing_text)
    fields_seen: list[str] = field(default_factory=list)  # the first few text-valued fields of those records

    def add_no_field(self, record: dict, names: int = 12) -> None:
        self.no_field += 1
        for name, value in record.items():
            if len(self.fields_seen) >= names:
                break
            if isinstance(value, str) and value.strip() and name not in self.fields_seen:
                self.fields_seen.append(name)

    def counts(self) -> dict[str, int]:
        """The counters, which sum over files and ranks (the lists are for messages)."""
        return {name: value for name, value in asdict(self).items() if isinstance(value, int)}

    def add_not_text(self, path: Path, line_no: int, value: object, examples: int = 3) -> None:
        self.not_text += 1
        if len(self.not_text_at) < examples:
            self.not_text_at.append(f"{path}:{line_no} ({_json_type(value)})")


def _json_type(value: object) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def preset_files(name: str) -> list[Path]:
    """The files of a built-in corpus; ``python-stdlib`` is this interpreter's standard library."""
    if name != "python-stdlib":
        raise UserError(f"unknown corpus preset {name!r} (known: {', '.join(PRESETS)})")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))


@dataclass
class Skipped:
    """Files of input folders that are not read, by reason ("binary", "unreadable", ...)."""
    by_reason: dict[str, list[Path]] = field(default_factory=dict)

    def add(self, path: Path, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    def describe(self, examples: int = 3) -> str:
        """E.g. "skipped 3 files: 2 binary (a.png, b.bin), 1 hidden (.git/config)"; "" if none."""
        if not self.by_reason:
            return ""
        parts = []
        for reason, paths in sorted(self.by_reason.items()):
            names = ", ".join(str(p) for p in sorted(paths)[:examples]) + (", ..." if len(paths) > examples else "")
            parts.append(f"{len(paths)} {reason} ({names})")
        total = sum(len(paths) for paths in self.by_reason.values())
        return f"skipped {total} file{'s' if total != 1 else ''}: " + ", ".join(parts)


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)  # .git, .venv, editor files


def _folder_file_reason(path: Path, folder: Path) -> str:
    """Why a file found in an input folder is not read ("" when it is): a known suffix is
    read; other files, compressed ones decompressed, when their content looks like text."""
    if _hidden(path, folder):
        return "hidden"
    kind = path_kind(path)
    if kind != "file":
        return kind  # see resolve_inputs
    if path.name.endswith(KNOWN_SUFFIXES):
        return ""
    try:
        head = read_head(path, 8192)
    except UserError:
        return "unreadable"
    if not head:
        return "empty"
    return "binary" if looks_binary(head) else ""


def resolve_inputs(inputs: list[str], skipped: Skipped | None = None) -> list[Path]:
    """Expand files, folders (their files, recursively) and globs into a sorted list.

    Regular files named directly are always read; pipes, sockets and devices never. In
    folders, files with a known suffix are read and others when their content is text; what
    is left out is recorded in ``skipped``. A folder saved by ``datasets``' save_to_disk,
    named or found in a folder, stands for its Arrow files, which sort in its own order (see
    :func:`~hvdllm.data.formats.saved_dataset_files`); a DatasetDict's folder is refused.
    """
    skipped = skipped if skipped is not None else Skipped()
    files: set[Path] = set()
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] if glob.has_magic(item) else [Path(item)]
        if not matches or not all(m.exists() for m in matches):
            raise UserError(f"{item}: no such file or folder")
        for match in matches:
            kind = path_kind(match)
            if kind == "file":
                files.add(match)
            elif kind == "folder":
                _add_folder_files(match, files, skipped)
            else:
                skipped.add(match, kind)  # a pipe, a socket, a device: reading one would block or never end
    if not files:
        detail = f"; {skipped.describe()}" if skipped.by_reason else ""
        raise UserError(f"no input files found in {', '.join(inputs)}{detail}")
    return sorted(files)


def _add_folder_files(folder: Path, files: set[Path], skipped: Skipped) -> None:
    dataset = saved_dataset_files(folder)
    if dataset is not None:
        files.update(dataset)
        return
    for parent, subfolders, names in os.walk(folder):  # symbolic links to folders are not followed
        parent = Path(parent)
        for name in list(subfolders):
            sub = parent / name
            if _hidden(sub, folder) or sub.is_symlink():
                continue
            dataset = saved_dataset_files(sub)
            if dataset is not None:  # its Arrow files are the corpus, not its JSON metadata
                files.update(dataset)
                subfolders.remove(name)
        for name in names:
            path = parent / name
            reason = _folder_file_reason(path, folder)
            if reason:
                skipped.add(path, reason)
            else:
                files.add(path)


def looks_binary(head: bytes) -> bool:
    """More than 30% of the characters are undecodable or control characters (a stray NUL
    or two in real text is cleaning's job, not a reason to refuse the file)."""
    if not head:
        return False
    text = head.decode("utf-8", errors="replace")
    junk = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\v\b\x1b"))
    return junk > 0.3 * len(text)


def _decode(raw: bytes, stats: ReadStats) -> str:
    text = raw.decode("utf-8", errors="replace")
    stats.replaced_bytes += text.count("\ufffd") - raw.count("\ufffd".encode())
    return text


def _size_on_disk(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None


def _whole_file(index: int, path: Path, stats: ReadStats) -> Document:
    raw = b"".join(byte_chunks(path))  # a text file is one document: read whole
    if looks_binary(raw[:8192]):
        raise UserError(f"{path}: binary file, not text")
    return Document((index, 0), _decode(raw, stats))


def _jsonl_records(path: Path, strict: bool, stats: ReadStats) -> Iterator[tuple[int, dict | None]]:
    """(line number, record) per non-blank line; the record is None for a line that is not a
    JSON object, counted in ``stats`` (an error when ``strict``)."""
    for line_no, line in enumerate(lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(line, stats))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if strict:
                raise UserError(f"{path}:{line_no}: not a JSON object: {err}") from None
            stats.bad_json_lines += 1
            record = None
        yield line_no, record


def field_value(record: dict, name: str) -> tuple[bool, object]:
    """(found, value) of field ``name`` of ``record``. A key spelled ``name`` wins; else a
    dotted name is a path into nested objects: "meta.body" is record["meta"]["body"]."""
    if name in record:
        return True, record[name]
    value: object = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _record_document(path: Path, key: tuple[int, int], record: dict, text_field: str, strict: bool,
                     stats: ReadStats) -> Document | None:
    """The document of one record, or None when it has no text (counted in ``stats``)."""
    prompt, completion = record.get("prompt"), record.get("completion")  # PROMPT_FIELDS, spelled out: per record, hot
    if isinstance(prompt, str) and isinstance(completion, str) and completion:
        return Document(key, prompt + completion, prompt_chars=len(prompt))
    found, text = field_value(record, text_field)
    if found and not isinstance(text, str):
        if strict:
            raise UserError(f"{path}:{key[1]}: {text_field!r} is a JSON {_json_type(text)}, not text")
        stats.add_not_text(path, key[1], text)
        return None
    if not text or not text.strip():
        stats.missing_text += 1
        if not found:
            stats.add_no_field(record)
        return None
    return Document(key, text)


def read_documents(index: int, path: Path, text_field: str = "text", strict: bool = False,
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of one file, streaming: the whole file for text (plain, .gz or .zst); one
    per record for JSONL (plain, .gz or .zst), whose records are its lines, and for Parquet and
    Arrow IPC files, whose records are their rows (as JSON-like objects).

    A record with string ``prompt`` and non-empty ``completion`` fields becomes one document
    whose prompt part is masked out of the loss; otherwise ``text_field`` (see
    :func:`field_value`) is read. Keys are (index, 0) for a whole file, else (index, line or
    row number from 1).
    """
    stats = stats if stats is not None else ReadStats()
    stats.files += 1
    stats.bytes += _size_on_disk(path)  # compressed size for .gz and .zst: known without reading, and stable
    if is_table(path):
        records = enumerate(table_rows(path, text_field, PROMPT_FIELDS), start=1)
    elif is_jsonl(path):
        records = _jsonl_records(path, strict, stats)
    else:
        stats.records += 1
        yield _whole_file(index, path, stats)
        return
    for number, record in records:
        stats.records += 1
        document = None if record is None else _record_document(path, (index, number), record, text_field,
                                                                 strict, stats)
        if document is not None:
            yield document
