"""Checkpoints: what a training state is, how it is written atomically (temp file, fsync,
rename) by the ranks that hold it, pruned, checked and resumed from.

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

from hvdllm.atomic import atomic_path, atomic_write
from hvdllm.config import config_to_toml
from hvdllm.errors import UserError
from hvdllm.model import GPTConfig

_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
REQUIRED_KEYS = ("model", "optimizer", "step", "config_toml", "model_config")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Write ``state`` as step-N.pt, point best.pt at it if ``is_best``, prune old steps."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    with atomic_write(path) as f:
        torch.save(state, f)
    if is_best:
        with atomic_path(folder / "best.pt") as link:  # a second name for the same file, no copy
            os.link(path, link)
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


def resume_state(cfg, run_dir: Path, model_config: dict) -> tuple[Path | None, dict | None]:
    """The checkpoint ``checkpoint.resume`` asks for, checked against this run; refuses to
    start a fresh run over a run folder that holds checkpoints."""
    path, state = resolve_resume(cfg.checkpoint.resume, run_dir)
    if state is None and step_checkpoints(checkpoint_dir(run_dir)):
        raise UserError(f"{run_dir} already holds checkpoints: continue it with "
                        f"--checkpoint.resume=auto, or choose another --train.run_dir")
    if state is not None and state["model_config"] != model_config:
        raise UserError(f"{path}: checkpoint was trained with a different model "
                        f"({state['model_config']}), not {model_config}")
    return path, state


def model_config_from_checkpoint(state: dict) -> GPTConfig:
    return GPTConfig(**state["model_config"])


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_training_state(trainer, is_best: bool) -> None:
    """Collective (every rank contributes its RNG state, so dropout replays exactly); the
    ranks holding state no other rank holds write it."""
    strategy, cfg = trainer.strategy, trainer.cfg
    rng_states = strategy.allgather_object(rng_state(trainer.device), name="checkpoint_rng")
    if not strategy.writes_checkpoint:
        return
    state = {
        **strategy.state_dict(trainer.model, trainer.optimizer),
        "schedule": trainer.schedule.state_dict(),
        "scaler": trainer.precision.scaler.state_dict() if trainer.precision.scaler is not None else None,
        "step": trainer.step,
        "stage": trainer.stage.index,
        "data": trainer.loader.state_dict(),
        "rng": rng_states,
        "val_loss": trainer.val_loss.state_dict(),
        "world_size": strategy.world_size,
        "config_toml": config_to_toml(cfg),
        "model_config": vars(trainer.gpt_cfg),
        "tokenizer_json": trainer.tokenizer_json,
    }
    save_checkpoint(state, trainer.run_dir, trainer.step, cfg.checkpoint.keep_last,
                    is_best and cfg.checkpoint.keep_best)


def restore_training_state(trainer, state: dict) -> None:
    """Put ``trainer`` where the checkpoint left off: weights, optimizer, scaler, step, the
    stage with its data position and schedule, the validation record and this rank's RNG."""
    trainer.strategy.load_state_dict(trainer.model, trainer.optimizer, state)
    if trainer.precision.scaler is not None and state.get("scaler"):
        trainer.precision.scaler.load_state_dict(state["scaler"])
    trainer.step = int(state["step"])
    trainer.val_loss.load_state_dict(state["val_loss"])
    if trainer.step < trainer.total_steps:
        stage = trainer.stage_at(trainer.step)
        same_stage = stage.index == state["stage"]
        trainer.enter_stage(stage, state["data"] if same_stage else None, state["schedule"] if same_stage else None)
    rng, rank = state["rng"], trainer.strategy.coords.rank
    if len(rng) == trainer.strategy.world_size:
        torch.set_rng_state(rng[rank]["torch"])
        if trainer.device.type == "cuda" and "cuda" in rng[rank]:
            torch.cuda.set_rng_state(rng[rank]["cuda"], trainer.device)
    elif trainer.strategy.is_logging_rank:
        sys.stderr.write(f"warning: checkpoint has RNG states of {len(rng)} ranks, this run has "
                         f"{trainer.strategy.world_size}: dropout will not replay exactly\n")
