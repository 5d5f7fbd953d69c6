"""Where documents come from: files, folders and globs of text and JSONL, or a built-in preset.

A document is a :class:`Document` with a stable key (file index, record index) that orders
the whole corpus the same way whatever the number of ranks reading it.
"""

from __future__ import annotations

import glob
import gzip
import json
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from hvdllm.errors import UserError
from hvdllm.paths import path_kind

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl", ".jsonl.gz")
PRESETS = ("python-stdlib",)


@dataclass
class Document:
    key: tuple[int, int]  # (file index in the sorted input list, record index in the file)
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

    def counts(self) -> dict[str, int]:
        """The counters, which sum over files and ranks (``not_text_at`` is for messages)."""
        return {name: value for name, value in asdict(self).items() if isinstance(value, int)}

    def add_not_text(self, path: Path, line_no: int, value: object, examples: int = 3) -> None:
        self.not_text += 1
        if len(self.not_text_at) < examples:
            self.not_text_at.append(f"{path}:{line_no} ({_json_type(value)})")


def _json_type(value: object) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")


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


def _folder_file_reason(path: Path, folder: Path) -> str:
    """Why a file found in an input folder is not read ("" when it is): a known text or
    JSONL suffix is read; other files are read when their content looks like text."""
    if any(part.startswith(".") for part in path.relative_to(folder).parts):
        return "hidden"  # .git, .venv, editor files: never the corpus
    kind = path_kind(path)
    if kind != "file":
        return kind  # see resolve_inputs
    if path.name.endswith(TEXT_SUFFIXES):
        return ""
    if path.name.endswith(".gz"):
        return "compressed but not .jsonl.gz"
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return "unreadable"
    if not head:
        return "empty"
    return "binary" if looks_binary(head) else ""


def resolve_inputs(inputs: list[str], skipped: Skipped | None = None) -> list[Path]:
    """Expand files, folders (their text files, recursively) and globs into a sorted list.

    Regular files named directly are always read; pipes, sockets and devices never. In
    folders, files with a known suffix are read and others when their content is text; what
    is left out is recorded in ``skipped``.
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
    for path in sorted(p for p in folder.rglob("*") if not p.is_dir()):
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


def read_documents(index: int, path: Path, text_field: str = "text", strict: bool = False,
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of one file: the whole file for text, one per record for JSONL.

    JSONL records with ``prompt`` and ``completion`` fields become one document whose prompt
    part is masked out of the loss; otherwise ``text_field`` is read.
    """
    stats = stats if stats is not None else ReadStats()
    try:
        raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    stats.files += 1
    stats.bytes += len(raw)
    if not _is_jsonl(path):
        if looks_binary(raw[:8192]):
            raise UserError(f"{path}: binary file, not text")
        stats.records += 1
        yield Document((index, 0), _decode(raw, stats))
        return
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        stats.records += 1
        try:
            record = json.loads(_decode(line, stats))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if strict:
                raise UserError(f"{path}:{line_no}: not a JSON object: {err}") from None
            stats.bad_json_lines += 1
            continue
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str) and completion:
            yield Document((index, line_no), prompt + completion, prompt_chars=len(prompt))
            continue
        text = record.get(text_field)
        if text_field in record and not isinstance(text, str):
            if strict:
                raise UserError(f"{path}:{line_no}: {text_field!r} is a JSON {_json_type(text)}, not text")
            stats.add_not_text(path, line_no, text)
            continue
        if not text or not text.strip():
            stats.missing_text += 1
            continue
        yield Document((index, line_no), text)
