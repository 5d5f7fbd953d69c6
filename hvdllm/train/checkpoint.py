"""Checkpoints: written by rank 0 atomically (temp file, fsync, rename), read by every rank.

Files live in ``RUN_DIR/checkpoints/``: ``step-00000100.pt`` for the last K steps and
``best.pt`` (a hard link to the step with the best validation loss). Everything in them is
tensors, numbers, strings, lists and dicts, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from hvdllm.errors import UserError

_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
REQUIRED_KEYS = ("model", "optimizer", "step", "config_toml", "model_config")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Write ``state`` as step-N.pt, point best.pt at it if ``is_best``, prune old steps."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if is_best:
        link_tmp = folder / f".best.pt.tmp-{os.getpid()}"
        link_tmp.unlink(missing_ok=True)
        os.link(path, link_tmp)
        os.replace(link_tmp, folder / "best.pt")
    for old in step_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)  # best.pt is a separate link and survives
    return path


def step_checkpoints(folder: Path) -> list[Path]:
    """step-N.pt files, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint; a UserError naming the file if it is corrupt or truncated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors, zip errors...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path}: not an hvdllm checkpoint (missing {', '.join(missing)})")
    return state


def resolve_resume(resume: str, run_dir: str | Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from: none, an explicit path (must be sound), or ``auto``: the
    newest sound step checkpoint of the run (corrupt ones are skipped with a warning)."""
    if not resume:
        return None, None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    for path in reversed(step_checkpoints(checkpoint_dir(run_dir))):
        try:
            return path, load_checkpoint(path)
        except UserError as err:
            sys.stderr.write(f"warning: skipping {err}\n")  # one write: ranks must not interleave
            sys.stderr.flush()
    return None, None
