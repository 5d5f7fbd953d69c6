"""The training loop: ``Trainer.train() -> train_step() -> forward_backward_step()``.

The Trainer does not know how updates travel between ranks: it calls an
:class:`~hvdllm.parallel.UpdateStrategy`. Everything that a user's input can break is
checked in ``__init__``, identically on every rank, before the first collective, so a bad
setting ends every rank with the same one-line error instead of a hang.

Every rank must issue the same collectives in the same order. Per optimizer step there is
exactly one exchange: the gradients and, in the same round, the step statistics (loss, a
NaN flag and a stop flag), so a NaN on one rank, or a SIGTERM reaching only one rank, is
acted on by all ranks at the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hvdllm.config import Config, config_to_toml
from hvdllm.data import DistributedBatches, ShardedSamples
from hvdllm.data.shards import read_manifest
from hvdllm.errors import UserError
from hvdllm.model import GPT, GPTConfig, gpt_config_from
from hvdllm.model.flops import flops_per_token
from hvdllm.optim import LRSchedule, build_optimizer, scaled_lr
from hvdllm.parallel import UpdateStrategy
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.metrics import MetricsLogger, guess_peak_flops, peak_memory_bytes


@dataclass
class Stage:
    index: int
    start_step: int  # global step at which the stage begins
    steps: int
    batch_size: int  # per rank per micro-batch
    seq_len: int
    lr: float  # peak lr, already scaled for the number of ranks
    schedule: object  # a ScheduleConfig


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    stop_requested: bool
    step_time_s: float
    tokens: int


def plan_stages(cfg: Config, world: int, shard_seq_len: int, block_size: int) -> list[Stage]:
    """The run as stages (one when no [[stages]] are configured), checked against the data and
    the model. Raises UserError naming the setting at fault."""
    accum = cfg.parallel.accum_steps
    batch = cfg.data.batch_size
    if cfg.data.global_batch_size:
        per_step = world * accum
        if cfg.data.global_batch_size % per_step:
            raise UserError(f"data.global_batch_size {cfg.data.global_batch_size} is not divisible by "
                            f"{world} ranks x parallel.accum_steps {accum}")
        batch = cfg.data.global_batch_size // per_step
    base_lr = scaled_lr(cfg.optim.lr, world, cfg.schedule.scale_rule)
    specs = cfg.stages or [None]
    stages, start = [], 0
    for index, spec in enumerate(specs):
        seq_len = (spec.seq_len if spec and spec.seq_len else 0) or cfg.data.seq_len or shard_seq_len
        where = f"stages[{index}].seq_len" if spec and spec.seq_len else "data.seq_len"
        if seq_len > block_size:
            raise UserError(f"{where} {seq_len} is above the model's context (model.block_size {block_size})")
        if seq_len > shard_seq_len:
            raise UserError(f"{where} {seq_len} is longer than the shards' seq_len {shard_seq_len}")
        schedule = cfg.schedule
        if spec and spec.schedule:
            schedule = replace(schedule, name=spec.schedule)
        if spec and spec.warmup_steps >= 0:
            schedule = replace(schedule, warmup_steps=spec.warmup_steps)
        steps = spec.steps if spec else cfg.train.steps
        lr = scaled_lr(spec.lr, world, cfg.schedule.scale_rule) if spec and spec.lr else base_lr
        stages.append(Stage(index, start, steps, (spec.batch_size if spec and spec.batch_size else batch),
                            seq_len, lr, schedule))
        start += steps
    return stages


class Trainer:
    def __init__(self, cfg: Config, strategy: UpdateStrategy, device: torch.device) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.device = device
        self.rank, self.dp_size = strategy.data_rank
        self.world = strategy.world_size
        self.is_main = self.rank == 0
        self.stop_requested = False

        # --- checks of user input: identical on every rank, before any collective -------
        if cfg.parallel.data_parallel and cfg.parallel.data_parallel != self.world:
            raise UserError(f"world size {self.world} does not fit parallel.data_parallel="
                            f"{cfg.parallel.data_parallel}: launch with -np {cfg.parallel.data_parallel}")
        if cfg.train.precision == "fp16" and device.type != "cuda":
            raise UserError("train.precision=fp16 needs a CUDA device (use bf16 on the CPU)")
        manifest = read_manifest(cfg.data.path)
        data_vocab = manifest["vocab_size"]
        if cfg.model.vocab_size and cfg.model.vocab_size < data_vocab:
            raise UserError(f"the data's vocabulary ({data_vocab} in {cfg.data.path}) is larger than "
                            f"model.vocab_size {cfg.model.vocab_size}")
        try:
            self.gpt_cfg = gpt_config_from(cfg.model, vocab_size=data_vocab)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.stages = plan_stages(cfg, self.dp_size, manifest["seq_len"], self.gpt_cfg.block_size)
        self.total_steps = self.stages[-1].start_step + self.stages[-1].steps
        self.run_dir = Path(cfg.train.run_dir)
        resume_path, state = ckpt.resolve_resume(cfg.checkpoint.resume, self.run_dir)
        if state is None and ckpt.step_checkpoints(ckpt.checkpoint_dir(self.run_dir)):
            raise UserError(f"{self.run_dir} already holds checkpoints: continue it with "
                            f"--checkpoint.resume=auto, or choose another --train.run_dir")
        if state is not None and state["model_config"] != vars(self.gpt_cfg):
            raise UserError(f"{resume_path}: checkpoint was trained with a different model "
                            f"({state['model_config']}), not {vars(self.gpt_cfg)}")
        self.train_samples = ShardedSamples(cfg.data.path, "train", cfg.data.verify_checksums)
        has_val = any(e["split"] == "val" for e in manifest["shards"])
        self.val_samples = ShardedSamples(cfg.data.path, "val", cfg.data.verify_checksums) if has_val else None
        self.tokenizer_json = (Path(cfg.data.path) / manifest["tokenizer"]["file"]).read_text()

        # --- build ----------------------------------------------------------------------
        torch.manual_seed(cfg.train.seed)
        self.model = GPT(self.gpt_cfg).to(device)
        self.optimizer = strategy.wrap_optimizer(build_optimizer(self.model, cfg.optim, self.stages[0].lr), self.model)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self.step = 0
        self.bad_steps_in_row = 0
        self.best_val = math.inf
        self.evals_without_improvement = 0
        self.stage: Stage | None = None
        self.schedule: LRSchedule | None = None
        self.loader: DistributedBatches | None = None
        self.batches = None
        n_dense = self.model.num_params(non_embedding=True)
        self.flops_per_token = {s.index: flops_per_token(n_dense, self.gpt_cfg.n_layer, self.gpt_cfg.n_head,
                                                         self.gpt_cfg.d_model // self.gpt_cfg.n_head, s.seq_len)
                                for s in self.stages}
        self.peak_flops = cfg.train.peak_flops or guess_peak_flops(device, torch.get_num_threads())
        if state is not None:
            self._load_state(state)
            if self.is_main:
                print(f"resuming from {resume_path} at step {self.step}", flush=True)
        self.strategy.broadcast_state(self.model, self.optimizer)  # the first collective
        self.logger = self._start_logging(resumed=state is not None)

    # --- set-up helpers ------------------------------------------------------------------
    def _start_logging(self, resumed: bool) -> MetricsLogger | None:
        if not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(self.cfg))
        metrics = self.run_dir / "metrics.jsonl"
        if resumed and metrics.exists():  # drop what was logged after the checkpoint
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            tmp = metrics.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(metrics)
        elif not resumed:
            metrics.unlink(missing_ok=True)
        return MetricsLogger(self.run_dir, self.total_steps, self.cfg.log.tensorboard, self.cfg.log.progress,
                             start_step=self.step)

    def _enter_stage(self, stage: Stage, data_state: dict | None = None, schedule_state: dict | None = None) -> None:
        if self.loader is not None:
            self.loader.close()
        self.stage = stage
        self.loader = DistributedBatches(self.train_samples, self.rank, self.dp_size, stage.batch_size,
                                         seed=self.cfg.data.seed + stage.index, shuffle=self.cfg.data.shuffle,
                                         seq_len=stage.seq_len, random_offset=self.cfg.data.random_offset,
                                         prefetch=self.cfg.data.prefetch)
        if data_state:
            self.loader.load_state_dict(data_state)
        self.batches = iter(self.loader)
        self.schedule = LRSchedule(self.optimizer, stage.lr, stage.steps, stage.schedule)
        if schedule_state:
            self.schedule.load_state_dict(schedule_state)

    def _stage_at(self, step: int) -> Stage:
        return next(s for s in self.stages if step < s.start_step + s.steps)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def request_stop(self, *_args) -> None:
        """SIGTERM handler: finish the current step, checkpoint, exit 0 (all ranks agree)."""
        self.stop_requested = True

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> int:
        """Run to the end (or an early stop, a preemption, too many bad steps); exit status."""
        try:
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the loader's reader thread and flush the logs."""
        if self.loader is not None:
            self.loader.close()
        if self.logger is not None:
            self.logger.close()

    def _train(self) -> int:
        while self.step < self.total_steps:
            result = self.train_step()
            if result.stop_requested:
                self.save_checkpoint(is_best=False)
                self._say(f"stop requested (SIGTERM): checkpoint written at step {self.step}; exiting")
                return 0
            if result.skipped:
                self.bad_steps_in_row += 1
                self._say(f"warning: step {self.step + 1}: non-finite loss or gradient, update skipped "
                          f"({self.bad_steps_in_row} in a row)")
                if self.bad_steps_in_row >= self.cfg.train.max_bad_steps:
                    self._say(f"error: {self.bad_steps_in_row} non-finite steps in a row (train.max_bad_steps): "
                              f"stopping; the last good checkpoint is kept in {ckpt.checkpoint_dir(self.run_dir)}")
                    return 1
            else:
                self.bad_steps_in_row = 0
            self.step += 1
            record = self._step_record(result)
            every = self.cfg.train.eval_every
            evaluate = (every and self.step % every == 0) or self.step == self.total_steps
            improved = False
            if evaluate and self.val_samples is not None:
                record.update(self.evaluate())
                improved = self._observe_validation(record["val_loss"])
            if self.logger is not None:
                if evaluate or self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
                    self.logger.log(record)
                self.logger.advance()
            patience = self.cfg.train.early_stop_patience
            stop_early = bool(patience) and self.evals_without_improvement >= patience
            every_ckpt = self.cfg.checkpoint.every
            # An improving evaluation is checkpointed at once, so best.pt is exactly the best model.
            due = (every_ckpt and self.step % every_ckpt == 0) or self.step == self.total_steps or stop_early
            # Not in a run of skipped steps: the newest checkpoint stays the last good state.
            if (due or improved) and self.bad_steps_in_row == 0:
                self.save_checkpoint(is_best=improved)
            if stop_early:
                self._say(f"early stop at step {self.step}: no val improvement in {patience} evaluations "
                          f"(best {self.best_val:.4f})")
                break
        self._finish()
        return 0

    def train_step(self) -> StepResult:
        """One optimizer step (``self.step`` is the caller's to advance): accumulate
        micro-batches, exchange gradients, clip, update."""
        stage = self._stage_at(self.step)
        if stage is not self.stage:
            self._enter_stage(stage)
        start = time.perf_counter()
        local_step = self.step - self.stage.start_step
        lr = self.schedule.apply(local_step)
        self.model.train()
        accum = self.cfg.parallel.accum_steps
        loss_sum, finite = 0.0, True
        for _ in range(accum):
            loss = self.forward_backward_step(next(self.batches), accum)
            finite = finite and math.isfinite(loss)
            loss_sum += loss if math.isfinite(loss) else 0.0
        stats = self.strategy.finish_gradients(
            self.optimizer, torch.tensor([loss_sum, 0.0 if finite else 1.0, 1.0 if self.stop_requested else 0.0],
                                         dtype=torch.float64))
        loss = stats[0].item() / (self.world * accum)
        skipped = stats[1].item() > 0
        grad_norm = float("nan")
        if not skipped:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            clip = self.cfg.optim.grad_clip or math.inf
            # Gradients are already averaged over ranks, so this norm is the global one.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
            if self.scaler is not None:
                self.strategy.apply_update(self.optimizer, self.scaler)  # skips itself on inf
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.strategy.apply_update(self.optimizer, None)
            else:
                skipped = True
        self.optimizer.zero_grad()  # Horovod's takes no set_to_none; torch's default is True
        tokens = self.world * accum * self.stage.batch_size * self.stage.seq_len
        return StepResult(loss, grad_norm, lr, skipped, stats[2].item() > 0, time.perf_counter() - start, tokens)

    def forward_backward_step(self, batch, accum: int) -> float:
        """Forward and backward of one micro-batch; returns its (unscaled) loss."""
        inputs = batch.inputs.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        mask = batch.loss_mask.to(self.device, non_blocking=True) if batch.loss_mask is not None else None
        with self._autocast():
            _, loss = self.model(inputs, targets, mask)
        scaled = loss / accum  # so k micro-batches add up to the mean over k * B samples
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.item()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, perplexity and next-token accuracy on the val split, summed over all ranks."""
        self.model.eval()
        loader = DistributedBatches(self.val_samples, self.rank, self.dp_size, self.stage.batch_size,
                                    seed=self.cfg.data.seed, shuffle=False, seq_len=self.stage.seq_len, prefetch=0)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, correct
        batches = iter(loader)
        for _ in range(min(self.cfg.train.eval_batches, loader.batches_per_epoch)):
            batch = next(batches)
            inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
            with self._autocast():
                logits, _ = self.model(inputs)
            losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                       reduction="none")
            mask = (batch.loss_mask.to(self.device).flatten() if batch.loss_mask is not None
                    else torch.ones_like(losses))
            correct = (logits.argmax(-1).flatten() == targets.flatten()).to(losses.dtype)
            sums += torch.stack([(losses * mask).sum(), mask.sum(), (correct * mask).sum()]).double().cpu()
        sums = self.strategy.allreduce_sum(sums, name="eval_stats")
        val_loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
                "val_acc": (sums[2] / sums[1].clamp(min=1)).item()}

    def _observe_validation(self, val_loss: float) -> bool:
        improved = val_loss < self.best_val
        if improved:
            self.best_val, self.evals_without_improvement = val_loss, 0
        else:
            self.evals_without_improvement += 1
        if self.schedule.observe_val_loss(val_loss):
            self._say(f"val loss plateaued: lr scale now {self.schedule.plateau_scale:g}")
        return improved

    def _step_record(self, result: StepResult) -> dict:
        tokens_per_s = result.tokens / result.step_time_s if result.step_time_s > 0 else 0.0
        mfu = None
        if self.peak_flops > 0:
            mfu = tokens_per_s * self.flops_per_token[self.stage.index] / (self.peak_flops * self.world)
        return {"step": self.step, "stage": self.stage.index, "epoch": self.loader.epoch,
                "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                "skipped": result.skipped, "tokens_per_s": tokens_per_s, "step_time_s": result.step_time_s,
                "mfu": mfu, "mem_peak_bytes": peak_memory_bytes(self.device)}

    def _say(self, message: str) -> None:
        if self.is_main:
            if self.logger is not None:
                self.logger.write(message)
            else:
                print(message, file=sys.stderr, flush=True)

    def _finish(self) -> None:
        if not self.is_main:
            return
        from hvdllm.train.report import plot_run, read_metrics, summarize

        records = read_metrics(self.run_dir)
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        print(summarize(records), flush=True)
        if self.cfg.log.plot:
            print(f"plot: {plot_run(records, self.run_dir / 'training.png')}", flush=True)

    # --- checkpoints -----------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self, is_best: bool) -> None:
        """Collective (every rank contributes its RNG state); rank 0 writes."""
        rng_states = self.strategy.allgather_object(self._rng_state(), name="checkpoint_rng")
        if not self.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "stage": self.stage.index,
            "data": self.loader.state_dict(),
            "rng": rng_states,
            "best_val": self.best_val,
            "evals_without_improvement": self.evals_without_improvement,
            "world_size": self.world,
            "config_toml": config_to_toml(self.cfg),
            "model_config": vars(self.gpt_cfg),
            "tokenizer_json": self.tokenizer_json,
        }
        ckpt.save_checkpoint(state, self.run_dir, self.step, self.cfg.checkpoint.keep_last,
                             is_best and self.cfg.checkpoint.keep_best)

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.evals_without_improvement = int(state["evals_without_improvement"])
        if self.step < self.total_steps:
            stage = self._stage_at(self.step)
            same_stage = stage.index == state["stage"]
            self._enter_stage(stage, state["data"] if same_stage else None,
                              state["schedule"] if same_stage else None)
        rng = state["rng"]
        if len(rng) == self.world:
            torch.set_rng_state(rng[self.rank]["torch"])
            if self.device.type == "cuda" and "cuda" in rng[self.rank]:
                torch.cuda.set_rng_state(rng[self.rank]["cuda"], self.device)
        elif self.is_main:
            print(f"warning: checkpoint has RNG states of {len(rng)} ranks, this run has {self.world}: "
                  f"dropout will not replay exactly", file=sys.stderr, flush=True)


def model_config_from_checkpoint(state: dict) -> GPTConfig:
    return GPTConfig(**state["model_config"])
