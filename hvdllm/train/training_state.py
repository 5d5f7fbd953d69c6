"""A checkpoint built from the run's stateful parts, and the parts put back from one.

The Trainer registers named parts, each with ``state_dict()`` and ``load_state_dict()``
(torchtitan's stateful components); a checkpoint is their states plus the facts that describe
the run, and nothing in it is read from the Trainer. docs/design/training-loop.md gives the
format and the older ones still read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch
from torch import nn

from hvdllm.train.checkpoint import (checkpoint_dir, checksum_path, publish_checkpoint, step_checkpoints,
                                     write_checkpoint)

# The part whose state lies at the checkpoint's top level ("model", "optimizer", "layout", and
# a strategy's own keys), where every reader of a checkpoint finds the weights: generate, export,
# warm start, the pipeline shards' checks. Every other part's state lies under its name.
MODEL_PARTS = "model_parts"


class Stateful(Protocol):
    """A part of the run that a checkpoint saves. A part whose ``state_dict()`` is a collective
    sets ``collective = True``: it is read on every rank, the others only where a rank writes."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ModelParts:
    """This rank's part of the model and its optimizer, as its strategy saves them (with the
    layout they were cut for, and the strategy's own state: local SGD's anchors, the async clock)."""

    def __init__(self, strategy, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.collective = strategy.gathers_checkpoint_state  # ZeRO gathers the optimizer state

    def state_dict(self) -> dict:
        return self.strategy.state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(self.model, self.optimizer, state)


class RankRNG:
    """Every rank's RNG state, so that dropout replays exactly on resume."""

    collective = True  # every rank gives its own

    def __init__(self, strategy, device: torch.device) -> None:
        self.strategy, self.device = strategy, device

    def state_dict(self) -> dict:
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"ranks": self.strategy.allgather_object(mine, name="checkpoint_rng")}

    def load_state_dict(self, state: dict) -> None:
        ranks, world = state["ranks"], self.strategy.world_size
        if len(ranks) == world:
            mine = ranks[self.strategy.coords.rank]
            torch.set_rng_state(mine["torch"])
            if self.device.type == "cuda" and "cuda" in mine:
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        elif self.strategy.is_logging_rank:
            sys.stderr.write(f"warning: checkpoint has RNG states of {len(ranks)} ranks, this run has "
                             f"{world}: dropout will not replay exactly\n")


def assemble_state(parts: Mapping[str, Stateful], step: int, facts: dict, collective_states: dict) -> dict:
    """What this rank holds of the run at ``step``: each part's state, ``facts`` (what the run
    is: config, model config, tokenizer, world size). ``collective_states`` holds the states of
    the collective parts, read on every rank; a collective part missing there is left out (an
    elastic commit, kept in memory, replays no dropout)."""
    state = {"step": step, **facts}
    for name, part in parts.items():
        if getattr(part, "collective", False):
            if name not in collective_states:
                continue
            part_state = collective_states[name]
        else:
            part_state = part.state_dict()
        if name == MODEL_PARTS:
            state.update(part_state)
        else:
            state[name] = part_state
    return state


def load_parts(parts: Mapping[str, Stateful], state: dict) -> int:
    """Load each part's state from the checkpoint ``state``; returns its step. A part the
    checkpoint holds nothing for keeps the state it has (a run without a loss scaler saved
    none; an elastic commit has no RNG)."""
    state = upgrade_state(state)
    for name, part in parts.items():
        saved = state if name == MODEL_PARTS else state.get(name)
        if saved is not None:
            part.load_state_dict(saved)
    return int(state["step"])


def upgrade_state(state: dict) -> dict:
    """A checkpoint in today's keys. Older ones kept the phase position as three top-level keys
    ("stage", from before "stage" meant a pipeline stage only, "data" and "schedule"), the
    validation record as two numbers, and the RNG states as a bare list."""
    state = dict(state)
    if "stage" in state:
        state["phase"] = {"index": state.pop("stage"), "data": state.pop("data"), "schedule": state.pop("schedule")}
    if state.get("val_loss") is None and "best_val" in state:
        state["val_loss"] = {"best": state.pop("best_val"), "since_best": state.pop("evals_without_improvement")}
    if isinstance(state.get("rng"), list):
        state["rng"] = {"ranks": state["rng"]}
    return state


class Checkpointer:
    """Saves the registered parts as checkpoints of the run in ``run_dir`` and loads them back."""

    def __init__(self, parts: Mapping[str, Stateful], strategy, run_dir: Path, cfg, facts: dict,
                 say: Callable[[str], None]) -> None:
        self.parts, self.strategy, self.run_dir, self.cfg = parts, strategy, run_dir, cfg
        self.facts, self.say = facts, say

    def state(self, step: int, collective_states: dict | None = None) -> dict:
        facts = {**self.facts, "world_size": self.strategy.world_size}
        return assemble_state(self.parts, step, facts, collective_states or {})

    def load(self, state: dict) -> int:
        return load_parts(self.parts, state)

    def save_if_due(self, step: int, final: bool, improved: bool, bad_steps_in_row: int,
                    stop_requested: bool) -> bool:
        """Collective when due: every ``checkpoint.every`` steps, at the run's end, and at once
        for an improving evaluation (so best.pt is exactly the best model). Not in a run of
        skipped steps (the newest checkpoint stays the last good state), except for a stop:
        resuming must continue exactly where this run ends. False when a due one failed."""
        every = self.cfg.every
        due = (every and step % every == 0) or final or improved
        if not due or (bad_steps_in_row and not stop_requested):
            return True
        return self.save(step, is_best=improved)

    def save(self, step: int, is_best: bool) -> bool:
        """Collective (the collective parts are read on every rank); the ranks holding state no
        other rank holds write it. A checkpoint is every stage's file or none: the writers agree
        before any of them prunes an older one or moves best.pt, so a failed write on any rank
        (a full disk, a quota) is one line, removes the step's other files, keeps the previous
        checkpoints, and returns False on every rank (the next due checkpoint tries again)."""
        strategy = self.strategy
        gathered = {name: part.state_dict() for name, part in self.parts.items() if getattr(part, "collective", False)}
        path, failure = None, None
        if strategy.writes_checkpoint:
            try:
                path = write_checkpoint(self.state(step, gathered), self.run_dir, step, strategy.checkpoint_shard)
            except OSError as err:
                failure = err.strerror or str(err)
        failed = strategy.allreduce_sum(torch.tensor([float(failure is not None)], dtype=torch.float64),
                                        name="checkpoint_failed").item() > 0
        if failed:
            self._discard(path, step, failure)
            return False
        if path is not None:
            publish_checkpoint(self.run_dir, step, self.cfg.keep_last, is_best and self.cfg.keep_best,
                               strategy.checkpoint_shard)
        self.say(f"checkpoint: step {step} saved to {path}" + (" (best so far)" if is_best else ""))
        return True

    def _discard(self, path: Path | None, step: int, failure: str | None) -> None:
        """Remove this rank's part of a checkpoint that is not whole; the rank that failed says why."""
        if path is not None:
            path.unlink(missing_ok=True)
            checksum_path(path).unlink(missing_ok=True)
        if failure is not None:
            kept = step_checkpoints(checkpoint_dir(self.run_dir))
            sys.stderr.write(f"error: rank {self.strategy.coords.rank}: checkpoint of step {step} not written "
                             f"({failure}); kept: {kept[-1] if kept else 'no earlier checkpoint'}\n")
            sys.stderr.flush()
