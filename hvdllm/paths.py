"""Checks of the paths a user passes: one wording everywhere, saying what a path *is* when it
is not what was asked for (a file given as a folder is not "missing").

Every check is local (no communication), so it can run on every rank before any collective.
"""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

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
