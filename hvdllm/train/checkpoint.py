"""Checkpoint files in ``RUN_DIR/checkpoints/``: written atomically with a sha256 beside them,
published (best.pt, pruning), checked and chosen for a resume. What a training state holds is
hvdllm/train/training_state.py's; docs/design/training-loop.md describes the files.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from hvdllm.atomic import atomic_path, atomic_write, write_text_atomic
from hvdllm.data.tokenizer import same_tokenizer
from hvdllm.errors import UserError, first_line
from hvdllm.model import GPTConfig
from hvdllm.parallel.ps_protocol import SERVER_SHARD
from hvdllm.parallel.reshard import merge_optimizer_slices, optimizer_state_by_name
from hvdllm.parallel.tensor import merge_tensor_shards

_STEP_FILE = re.compile(r"^step-(\d+)(?:\.stage-(\d+))?\.pt$")
REQUIRED_KEYS = ("model", "optimizer", "step", "config_toml", "model_config")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def shard_path(path: Path, shard: int) -> Path:
    """Where pipeline stage ``shard`` keeps its part of the checkpoint at ``path``: stage 0
    (and any layout of one stage) at ``path`` itself, stage S beside it as ``NAME.stage-S.pt``."""
    return path if shard == 0 else path.with_name(f"{path.stem}.stage-{shard}{path.suffix}")


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """A write-only file that hashes the bytes on their way to ``file`` (no second read)."""

    def __init__(self, file) -> None:
        self.file, self.sha = file, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err  # torch's zip writer reports it only as "unexpected pos ..."
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep_last: int, is_best: bool,
                    shard: int = 0) -> Path:
    """Write ``state`` as step-N.pt (pipeline stage ``shard``'s file), then publish it."""
    path = write_checkpoint(state, run_dir, step, shard)
    publish_checkpoint(run_dir, step, keep_last, is_best, shard)
    return path


def write_checkpoint(state: dict, run_dir: str | Path, step: int, shard: int = 0) -> Path:
    """Write ``state`` as step-N.pt (pipeline stage ``shard``'s file) with its checksum. An
    OSError (a full disk) leaves the previous checkpoints as they were and no partial file."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return write_state(state, shard_path(folder / f"step-{step:08d}.pt", shard))


def write_state(state: dict, path: Path) -> Path:
    """Write ``state`` at ``path`` with its checksum beside it, atomically (see write_checkpoint)."""
    with atomic_write(path) as f:
        writer = _HashingWriter(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None  # what really failed: a full disk, a quota
            raise
        write_text_atomic(checksum_path(path), writer.sha.hexdigest() + "\n")  # before the .pt is in place
    return path


def publish_checkpoint(run_dir: str | Path, step: int, keep_last: int, is_best: bool, shard: int = 0) -> None:
    """Point best.pt at step ``step`` if ``is_best`` and prune the steps beyond ``keep_last``."""
    folder = checkpoint_dir(run_dir)
    path = shard_path(folder / f"step-{step:08d}.pt", shard)
    if is_best:
        best = shard_path(folder / "best.pt", shard)
        for source, name in ((checksum_path(path), checksum_path(best)), (path, best)):
            with atomic_path(name) as link:  # a second name for the same file, no copy
                os.link(source, link)
    for old in step_checkpoints(folder, shard)[:-keep_last]:
        old.unlink(missing_ok=True)  # best.pt is a separate link and survives
        checksum_path(old).unlink(missing_ok=True)


def step_checkpoints(folder: Path, shard: int = 0) -> list[Path]:
    """step-N.pt files (of pipeline stage ``shard``), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_FILE.match(p.name)) and int(m.group(2) or 0) == shard]
    return [p for _, p in sorted(found)]


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def verify_checksum(path: Path, required: bool = False) -> None:
    """Compare the file with the checksum written beside it. Checkpoints of older versions
    have none and are only checked by loading, unless ``required`` (a shard of a checkpoint
    whose stage 0 file has one: its missing checksum means a lost or foreign file)."""
    stored = checksum_path(path)
    if not stored.is_file():
        if required:
            raise UserError(f"{path}: checkpoint shard has no {stored.name}, though its stage 0 file has one: "
                            f"it cannot be checked")
        return
    expected, actual = stored.read_text().strip(), file_sha256(path)
    if actual != expected:
        raise UserError(f"{path}: corrupt checkpoint (sha256 {actual[:16]}..., but {stored.name} "
                        f"says {expected[:16]}...)")


def load_checkpoint(path: str | Path, checksum_required: bool = False) -> dict:
    """Load and check a checkpoint; a UserError naming the file if it is corrupt or truncated
    (or, when ``checksum_required``, has no checksum beside it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file")
    verify_checksum(path, checksum_required)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors, zip errors...
        reason = first_line(err)
        raise UserError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"{path}: not an hvdllm checkpoint (missing {', '.join(missing)})")
    return state


def resolve_resume(resume: str, run_dir: str | Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from, with its stage 0 file's state: none, an explicit path
    (must be sound), or ``auto``: the newest sound step checkpoint of the run (unsound ones are
    skipped with a warning). Sound means every file of it is there and matches its checksum:
    every rank reads this, so every rank picks the same step."""
    if not resume:
        return None, None
    if resume != "auto":
        return Path(resume), load_sound_checkpoint(Path(resume))
    for path in reversed(step_checkpoints(checkpoint_dir(run_dir))):
        try:
            return path, load_sound_checkpoint(path)
        except UserError as err:
            sys.stderr.write(f"warning: skipping {err}\n")  # one write: ranks must not interleave
            sys.stderr.flush()
    return None, None


def load_sound_checkpoint(path: Path) -> dict:
    """Stage 0's state of the checkpoint at ``path`` once each of its other files (see
    checkpoint_shards) is there and matches its checksum; else a UserError naming the first
    that does not."""
    state = load_checkpoint(path)
    required = checksum_path(path).is_file()
    for shard in checkpoint_shards(state)[1:]:
        check_shard(shard_path(path, shard), required)
    return state


def check_shard(path: Path, checksum_required: bool) -> None:
    """A shard's checkpoint file is there and matches its checksum."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint shard is missing")
    verify_checksum(path, checksum_required)


def resume_state(cfg, run_dir: Path, model_config: dict, tokenizer_json: str,
                 say: Callable[[str], None],
                 layout_problem: Callable[[dict], str]) -> tuple[Path | None, dict | None]:
    """The checkpoint ``checkpoint.resume`` asks for (its stage 0 file's state: see
    state_for_rank), checked against this run's model and tokenizer, and with
    ``layout_problem`` (the strategy's: what keeps this run's layout from taking the
    checkpoint's, "" if nothing) against its layout, on every rank before any reads a file
    another layout lacks; refuses to start a fresh run over a run folder that holds
    checkpoints. ``say`` prints a note on the logging rank."""
    path, state = resolve_resume(cfg.checkpoint.resume, run_dir)
    problem = "" if state is None else layout_problem(state.get("layout", {}))
    if problem:
        raise UserError(f"{path}: {problem}")
    folder = checkpoint_dir(run_dir)
    if state is None and step_checkpoints(folder):
        if cfg.checkpoint.resume == "auto":
            raise UserError(f"no sound checkpoint in {folder} (every one is corrupt, see the warnings above): "
                            f"move them away to start afresh, or pass --checkpoint.resume=PATH")
        raise UserError(f"{run_dir} already holds checkpoints: continue it with "
                        f"--checkpoint.resume=auto, or choose another --train.run_dir")
    if state is None and cfg.checkpoint.resume == "auto":
        say(f"note: checkpoint.resume=auto: no checkpoint in {folder}, so this is a fresh run "
            f"(metrics.jsonl starts anew)")
    if state is not None and state["model_config"] != model_config:
        raise UserError(f"{path}: checkpoint was trained with a different model "
                        f"({state['model_config']}), not {model_config}")
    if state is not None and not same_tokenizer(state["tokenizer_json"], tokenizer_json):
        raise UserError(f"{path}: checkpoint was trained with tokenizer sha256 {_text_sha(state['tokenizer_json'])}, "
                        f"but {cfg.data.path} was made with tokenizer sha256 {_text_sha(tokenizer_json)}: "
                        f"token ids would mean other text")
    return path, state


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_shards(state: dict) -> list[int]:
    """Every shard of the checkpoint whose stage 0 file holds ``state``, as its layout
    records it: one per model part; one per worker rank instead when the replicas differ
    (local SGD: each rank's file is its shard); and one per parameter server."""
    layout = state.get("layout", {})
    workers = model_shards(state) * (int(layout.get("data", 1)) if layout.get("replicas_differ") else 1)
    return list(range(workers)) + [SERVER_SHARD + k for k in range(int(layout.get("servers", 0)))]


def model_shards(state: dict) -> int:
    """How many files hold the model of the checkpoint whose first file holds ``state``: one per
    pipeline stage and tensor rank (shard ``stage * tensor + tensor_rank``)."""
    layout = state.get("layout", {})
    return int(layout.get("pipeline", 1)) * int(layout.get("tensor", 1))


def state_for_rank(path: Path, state: dict, shard: int, same_cut: bool) -> dict:
    """What a rank resumes from, given the checkpoint's stage 0 state: shard ``shard``'s file
    where this run cuts the model as the checkpoint does (``same_cut``), else the whole state
    (:func:`whole_state`), out of which the strategy cuts the rank's part."""
    if not same_cut:
        return whole_state(path, state)
    return load_shard(path, state, shard) if shard else state


def load_shard(path: Path, state: dict, shard: int) -> dict:
    """Shard ``shard``'s state of the checkpoint at ``path`` whose stage 0 file holds
    ``state``: checked like it (a checksum is required where stage 0 has one) and to hold the
    same step."""
    shard_file = shard_path(Path(path), shard)
    shard_state = load_checkpoint(shard_file, checksum_required=checksum_path(Path(path)).is_file())
    check_same_step(shard_file, shard_state, state["step"])
    return shard_state


def stage_states(path: Path, state: dict) -> list[list[dict]]:
    """The states of every model shard of the checkpoint at ``path`` (stage 0's is ``state``),
    a list of tensor ranks' states per pipeline stage."""
    states = [state] + [load_shard(path, state, shard) for shard in range(1, model_shards(state))]
    tensor = int(state.get("layout", {}).get("tensor", 1))
    return [states[first:first + tensor] for first in range(0, len(states), tensor)]


def full_model_state(path: Path, state: dict) -> dict:
    """The whole model's state dict from the checkpoint at ``path``: a pipeline run's stages
    each wrote their blocks beside it, under the full model's keys, so they merge as they are;
    a tensor-parallel stage's ranks each wrote a slice of its tensors, put back together."""
    merged = {}
    for stage in stage_states(path, state):
        merged.update(merge_tensor_shards([s["model"] for s in stage]) if len(stage) > 1 else stage[0]["model"])
    return merged


def whole_state(path: Path, state: dict) -> dict:
    """The checkpoint at ``path`` as one piece, for a run that cuts the model otherwise: stage
    0's state with the whole model's state dict and the whole optimizer state by parameter
    name (parallel/reshard.py), marked ``"whole"``. Every rank reads every shard: the memory of
    the whole model and its optimizer state, once, at the resume."""
    model, optimizer = {}, {}
    for stage in stage_states(path, state):
        models = [s["model"] for s in stage]
        model.update(merge_tensor_shards(models) if len(stage) > 1 else models[0])
        named = [optimizer_state_by_name(s["optimizer"], s["optimizer_names"]) for s in stage]
        optimizer.update(merge_optimizer_slices(models, named))
    return {**state, "model": model, "optimizer": optimizer, "whole": True}


def check_same_step(path: Path, state: dict, step: int) -> None:
    """A pipeline stage's file belongs to the same step as stage 0's."""
    if state["step"] != step:
        raise UserError(f"{path}: holds step {state['step']}, but its stage 0 file holds step {step}: "
                        f"the stages' checkpoints do not belong together")


def model_config_from_checkpoint(state: dict) -> GPTConfig:
    return GPTConfig(**state["model_config"])


def checkpoint_weights(path: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, str]:
    """(the whole model's state dict, its GPTConfig, tokenizer.json text) of the checkpoint at ``path``."""
    state = load_checkpoint(path)
    return full_model_state(path, state), model_config_from_checkpoint(state), state["tokenizer_json"]
