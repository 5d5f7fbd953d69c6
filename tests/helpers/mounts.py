"""Small tmpfs mounts for tests of full disks and read-only folders (needs root, as here)."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def tmpfs(folder: Path, size_kb: int, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size_kb`` KiB on ``folder`` (created) for the block; always unmounted."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def remount_read_only(folder: Path) -> None:
    """Make a mount made by :func:`tmpfs` read-only (root ignores file permissions)."""
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
