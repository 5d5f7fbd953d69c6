"""Checks of the paths a user passes: one wording everywhere, saying what a path *is* when it
is not what was asked for (a file given as a folder is not "missing").

Every check is local (no communication), so it can run on every rank before any collective.
"""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path
from typing import Callable

from hvdllm.errors import UserError


def path_kind(path: str | Path) -> str:
    """What is at ``path``: "missing", "folder", "file" or another kind ("socket", ...)."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:  # a parent of path is a file
        return "missing"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    for test, name in ((stat.S_ISFIFO, "pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device")):
        if test(mode):
            return name
    return "special file"


def _not_what(path: Path, what: str, want: str, hint: str) -> UserError:
    kind = path_kind(path)
    if kind == "missing":
        return UserError(f"{what} {path} does not exist{hint}")
    return UserError(f"{what} {path} is a {kind}, not a {want}")


def require_folder(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` as a Path if it is a folder; else a UserError saying what it is.

    Args:
        what: how the message names it, e.g. "data folder".
        hint: appended when it does not exist, e.g. " (run `hvdllm prepare` first)".
    """
    path = Path(path)
    if path_kind(path) != "folder":
        raise _not_what(path, what, "folder", hint)
    return path


def require_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` as a Path if it is a regular file; else a UserError saying what it is."""
    path = Path(path)
    if path_kind(path) != "file":
        raise _not_what(path, what, "file", hint)
    return path


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if path_kind(candidate) != "missing":
            return candidate
    return Path(".")


def require_writable_folder(path: str | Path, what: str) -> Path:
    """Check that ``path`` is a folder this process can write in, or can be created as one.

    Nothing is created: a probe file is made (and removed) in ``path`` or, when it does not
    exist yet, in its nearest existing parent, where creating it would write. An actual write
    is the only reliable test: root passes every permission check but not a read-only mount.
    """
    path = Path(path)
    existing = _nearest_existing(path)
    if path_kind(existing) != "folder":
        where = "" if existing == path else f": {existing}"
        raise UserError(f"{what} {path}{where} is a {path_kind(existing)}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".hvdllm-probe-"):
            pass
    except OSError as err:
        place = "" if existing == path else f" (cannot be created in {existing})"
        raise UserError(f"{what} {path} is not writable{place}: {err.strerror or err}") from None
    return path


def _holds(folder: Path, path: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (symbolic links followed)."""
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def require_replaceable(out: str | Path, what: str, overwrite: bool, sources: list[Path],
                        is_earlier_output: Callable[[Path], bool], output: str) -> Path:
    """``out`` as a Path if a command may write its output there: it does not exist, or
    ``overwrite`` is given and it is an empty folder or recognisably an earlier ``output`` of
    the same command (``is_earlier_output``). A command deletes only what it made, so ``out``
    is never replaced when it holds one of ``sources`` (the run being read, say), whatever
    ``overwrite`` says; else a UserError naming ``out``.

    Args:
        what: how the message names it, e.g. "--out".
        output: what the command writes, e.g. "hvdllm export folder".
    """
    out = Path(out)
    kind = path_kind(out)
    if kind == "missing":
        return out
    for source in sources:
        if _holds(out, source):
            raise UserError(f"{what} {out} holds {source}, which this command reads: it is never replaced; "
                            f"choose another {what}")
    if not overwrite:
        raise UserError(f"{out} exists: choose another {what}, or add --overwrite to replace it")
    if kind == "folder" and not any(out.iterdir()):
        return out
    if not is_earlier_output(out):
        raise UserError(f"{what} {out} is a {kind} that is not an earlier {output}: --overwrite replaces only "
                        f"what hvdllm wrote there; choose another {what}")
    return out
