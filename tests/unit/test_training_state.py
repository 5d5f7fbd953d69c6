"""A checkpoint assembled from the run's stateful parts: written, read back into fresh parts,
they hold the same state; a checkpoint in the keys of before the phases' rename loads alike."""

import math
from pathlib import Path

import pytest
import torch

from hvdllm.config import CheckpointConfig, ScheduleConfig, load_config
from hvdllm.data import DistributedBatches, ShardedSamples
from hvdllm.optim.plateau import BestTracker
from hvdllm.parallel import build_strategy
from hvdllm.train.checkpoint import load_checkpoint
from hvdllm.train.phases import Phase, Phases
from hvdllm.train.training_state import MODEL_PARTS, Checkpointer, ModelParts, RankRNG

STEP = 3  # inside the second phase, one step after it began


class Run:
    """The parts a Trainer registers, over a small linear model, built the same way each time."""

    def __init__(self, data: Path, run_dir: Path) -> None:
        strategy = build_strategy(load_config(), world_size=1)
        strategy.setup(threads=1)
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        samples = ShardedSamples(data, "train")
        schedule = ScheduleConfig(name="constant", warmup_steps=0)
        plan = [Phase(0, 0, 2, 2, 16, 1e-3, schedule), Phase(1, 2, 4, 3, 32, 5e-4, schedule)]
        self.phases = Phases(plan, lambda p: DistributedBatches(samples, 0, 1, p.batch_size, seed=p.index,
                                                                seq_len=p.seq_len, prefetch=0), self.optimizer)
        self.val_loss = BestTracker()
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        parts = {MODEL_PARTS: ModelParts(strategy, self.model, self.optimizer), "phase": self.phases,
                 "val_loss": self.val_loss, "rng": RankRNG(strategy, torch.device("cpu")), "scaler": self.scaler}
        facts = {"config_toml": "", "model_config": {}, "tokenizer_json": ""}
        self.checkpointer = Checkpointer(parts, strategy, run_dir, CheckpointConfig(), facts, lambda _: None)

    def train_to(self, step: int) -> None:
        """Move every part: weights and Adam moments, the data position, the plateau scale, the
        validation record, the loss scale and the RNG."""
        for s in range(step):
            self.phases.advance_to(s)
            next(self.phases.batches)
            self.model(torch.randn(2, 4)).square().mean().backward()
            self.optimizer.step()
        self.phases.schedule.plateau_scale = 0.25
        self.val_loss.observe(2.5)
        self.val_loss.observe(2.7)
        self.scaler.scale(torch.ones(1))  # the scale is made on first use
        self.scaler.update(new_scale=2.0 ** 5)

    def snapshot(self) -> dict:
        return {"weights": [p.detach().clone() for p in self.model.parameters()],
                "moments": [self.optimizer.state[p]["exp_avg"].clone() for p in self.model.parameters()],
                "phase": self.phases.current.index, "data": self.phases.loader.state_dict(),
                "plateau_scale": self.phases.schedule.plateau_scale, "best": self.val_loss.state_dict(),
                "scale": self.scaler.get_scale(), "next_random": torch.rand(3)}


def same(a: dict, b: dict) -> bool:
    def equal(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, list):
            return len(x) == len(y) and all(equal(i, j) for i, j in zip(x, y))
        return x == y
    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


def resumed(data: Path, tmp_path: Path, state: dict) -> dict:
    fresh = Run(data, tmp_path / "fresh")
    assert fresh.checkpointer.load(state) == STEP
    fresh.phases.advance_to(STEP)
    return fresh.snapshot()


@pytest.fixture
def saved(data, tmp_path):
    """(what the run held at STEP, the checkpoint it wrote there)."""
    run = Run(data, tmp_path / "run")
    run.train_to(STEP)
    rng = torch.get_rng_state()
    assert run.checkpointer.save(STEP, is_best=False)
    torch.set_rng_state(rng)  # the snapshot's random numbers follow the saved RNG state
    expected = run.snapshot()
    run.phases.close()
    return expected, load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{STEP:08d}.pt")


def test_a_checkpoint_from_parts_puts_every_part_back(data, tmp_path, saved):
    expected, state = saved
    assert {"model", "optimizer", "phase", "val_loss", "rng", "scaler", "step"} <= state.keys()
    assert state["phase"]["index"] == 1 and not math.isinf(state["val_loss"]["best"])
    torch.manual_seed(12345)  # anything else: the checkpoint's RNG must win
    assert same(resumed(data, tmp_path, state), expected)


def test_a_checkpoint_from_before_phases_resumes_the_same(data, tmp_path, saved):
    expected, state = saved
    old = {key: value for key, value in state.items() if key not in ("phase", "val_loss", "rng")}
    old.update(stage=state["phase"]["index"], data=state["phase"]["data"], schedule=state["phase"]["schedule"],
               best_val=state["val_loss"]["best"], evals_without_improvement=state["val_loss"]["since_best"],
               rng=state["rng"]["ranks"])
    assert same(resumed(data, tmp_path, old), expected)
