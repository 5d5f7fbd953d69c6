"""The training loop: ``Trainer.train() -> train_step()``.

The Trainer does not know how work and updates travel between ranks: it calls a
:class:`~hvdllm.parallel.ParallelStrategy`, already set up. Everything that a user's input
can break is checked in ``__init__``, identically on every rank, before the first
collective, so a bad setting ends every rank with the same one-line error instead of a hang.

Every rank must issue the same collectives in the same order. Per optimizer step there is
exactly one exchange: the gradients and, in the same round, the step statistics (loss, a
NaN flag and a stop flag), so a NaN on one rank, or a SIGTERM reaching only one rank, is
acted on by all ranks at the same step.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hvdllm.config import Config, config_to_toml
from hvdllm.data import DistributedBatches, ShardedSamples
from hvdllm.data.shards import read_manifest, read_tokenizer_json
from hvdllm.errors import UserError
from hvdllm.model import gpt_config_from
from hvdllm.model.flops import flops_per_token
from hvdllm.optim import LRSchedule, build_optimizer
from hvdllm.optim.plateau import BestTracker
from hvdllm.parallel import ParallelStrategy, Precision
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.evaluate import evaluate
from hvdllm.train.metrics import banner_lines, peak_flops, print_line, start_run_log, step_record
from hvdllm.train.stages import Stage, plan_stages
from hvdllm.train.warm_start import check_cpu_compiler, initial_model
from hvdllm.train.watchdog import StallWatchdog


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    stop_requested: bool
    step_time_s: float
    tokens: int


class Trainer:
    def __init__(self, cfg: Config, strategy: ParallelStrategy, device: torch.device) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.device = device
        self.rank, self.dp_size = strategy.data_rank
        self.is_main = strategy.is_logging_rank
        self.stop_requested = False

        # --- checks of user input: identical on every rank, before any collective -------
        if cfg.train.precision == "fp16" and device.type != "cuda":
            raise UserError("train.precision=fp16 needs a CUDA device (use bf16 on the CPU)")
        if cfg.train.compile and device.type == "cpu":
            check_cpu_compiler()
        manifest = read_manifest(cfg.data.path)
        data_vocab = manifest["vocab_size"]
        if cfg.model.vocab_size and cfg.model.vocab_size < data_vocab:
            raise UserError(f"the data's vocabulary ({data_vocab} in {cfg.data.path}) is larger than "
                            f"model.vocab_size {cfg.model.vocab_size}")
        try:
            self.gpt_cfg = gpt_config_from(cfg.model, vocab_size=data_vocab)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.shard_seq_len = manifest["seq_len"]
        self.stages = plan_stages(cfg, self.dp_size, self.shard_seq_len, self.gpt_cfg.block_size)
        self.total_steps = self.stages[-1].start_step + self.stages[-1].steps
        self.run_dir = Path(cfg.train.run_dir)
        self.tokenizer_json = read_tokenizer_json(cfg.data.path, manifest)
        self.logger, self.watchdog = None, None
        resume_path, state = ckpt.resume_state(cfg, self.run_dir, vars(self.gpt_cfg), self.tokenizer_json, self.say,
                                               shard=strategy.checkpoint_shard)
        self.train_samples = ShardedSamples(cfg.data.path, "train", cfg.data.verify_checksums)
        has_val = any(e["split"] == "val" for e in manifest["shards"])
        self.val_samples = ShardedSamples(cfg.data.path, "val", cfg.data.verify_checksums) if has_val else None

        # --- build ----------------------------------------------------------------------
        self.precision = Precision(cfg.train.precision, device)
        # Whole, before a strategy cuts it: every layout starts alike.
        model = initial_model(cfg, self.gpt_cfg, self.tokenizer_json, self.say, warm_start=state is None)
        if cfg.train.compile:
            model.compile_blocks()
        self.num_params, n_dense = model.num_params(), model.num_params(non_embedding=True)
        self.model = strategy.parallelize(model, device)
        self.optimizer = strategy.wrap_optimizer(build_optimizer(self.model, cfg.optim, self.stages[0].lr), self.model)
        self.step = 0
        self.bad_steps_in_row = 0
        self.val_loss = BestTracker()  # for early stopping, over the whole run
        self.step_callbacks: list = []  # after each step the loop goes on from, on every rank (elastic commits)
        self.stage: Stage | None = None
        self.schedule: LRSchedule | None = None
        self.loader: DistributedBatches | None = None
        self.batches = None
        g = self.gpt_cfg
        self.flops_per_token = {s.index: flops_per_token(n_dense, g.n_layer, g.n_head, g.d_model // g.n_head,
                                                         s.seq_len) for s in self.stages}
        self.peak_flops, self.peak_flops_source = 0.0, ""  # measured by the logging rank (start_log)
        self.hosts: list[str] = []
        if state is not None:
            ckpt.restore_training_state(self, state)
            self.say(f"resuming from {resume_path} at step {self.step}")
        # Under Horovod elastic a worker may join while the others sync, so the first
        # collective is the elastic State's (hvdllm/train/elastic.py), which starts the log.
        if not cfg.parallel.elastic:
            self.strategy.broadcast_state(self.model, self.optimizer)  # the first collective
            self.start_log(resumed=state is not None)

    def start_log(self, resumed: bool) -> None:
        """Collective (every rank's host name, for the banner). The logging rank opens the
        metrics log (``resumed``: keeping the lines up to this step) and writes the banner;
        a rank that is no longer the logging one (elastic) closes its log."""
        self.hosts = self.strategy.allgather_object(socket.gethostname(), name="hosts")
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if not self.is_main:
            return
        if not self.peak_flops_source:  # only the logging rank computes MFU
            self.peak_flops, self.peak_flops_source = peak_flops(self.device, self.cfg.train.precision,
                                                                 self.cfg.train.peak_flops)
        self.logger = start_run_log(self.run_dir, config_to_toml(self.cfg), self.cfg.log, self.total_steps,
                                    self.step, resumed=resumed)
        self.logger.write("\n".join(banner_lines(self)))

    def enter_stage(self, stage: Stage, data_state: dict | None = None, schedule_state: dict | None = None) -> None:
        """Start reading ``stage``'s data and following its schedule (optionally where a
        checkpoint left them)."""
        if self.loader is not None:
            self.loader.close()
        self.stage = stage
        self.loader = DistributedBatches(self.train_samples, *self.strategy.train_slice(stage.batch_size),
                                         seed=self.cfg.data.seed + stage.index, shuffle=self.cfg.data.shuffle,
                                         seq_len=stage.seq_len, random_offset=self.cfg.data.random_offset,
                                         prefetch=self.cfg.data.prefetch)
        if data_state:
            self.loader.load_state_dict(data_state)
        self.batches = iter(self.loader)
        self.schedule = LRSchedule(self.optimizer, stage.lr, stage.steps, stage.schedule)
        if schedule_state:
            self.schedule.load_state_dict(schedule_state)

    def adopt_world(self) -> None:
        """After the strategy's world changed (Horovod elastic): this rank's data slice, the
        stages' batch sizes and lr (the config's world-size rule). The caller restores a
        state next, which enters the stage at its data position."""
        self.rank, self.dp_size = self.strategy.data_rank
        self.is_main = self.strategy.is_logging_rank
        self.stages = plan_stages(self.cfg, self.dp_size, self.shard_seq_len, self.gpt_cfg.block_size)
        if self.loader is not None:
            self.loader.close()
        self.stage, self.loader, self.batches = None, None, None

    def stage_at(self, step: int) -> Stage:
        return next(s for s in self.stages if step < s.start_step + s.steps)

    def request_stop(self, *_args) -> None:
        """SIGTERM (or SIGUSR1) handler: finish the current step, checkpoint, exit 0 (all ranks agree)."""
        self.stop_requested = True

    # --- the loop --------------------------------------------------------------------------
    def train(self, loop=None) -> int:
        """Run to the end (or an early stop, a preemption, too many bad steps); exit status.
        ``loop`` runs the steps instead of :meth:`run_steps` (Horovod elastic wraps it)."""
        self.watchdog = StallWatchdog(self.cfg.train.stall_timeout_s, self.strategy.coords.rank,
                                      self.strategy.world_size)
        try:
            return (loop or self.run_steps)()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the watchdog and the loader's reader thread and flush the logs."""
        if self.watchdog is not None:
            self.watchdog.close()
        if self.loader is not None:
            self.loader.close()
        if self.logger is not None:
            self.logger.close()

    def run_steps(self) -> int:
        while self.step < self.total_steps:
            result = self.train_step()
            # A step that ran is done, whatever it carried: it moved the model (or was skipped)
            # and the loader, so it is counted, logged and checkpointed like any other.
            self.step += 1
            self.watchdog.beat(self.step)
            self.bad_steps_in_row = self.bad_steps_in_row + 1 if result.skipped else 0
            if result.skipped:
                self.say(f"warning: step {self.step}: non-finite loss or gradient, update skipped "
                         f"({self.bad_steps_in_row} in a row)")
            record = step_record(self, result)
            every = self.cfg.train.eval_every
            evaluated = (every and self.step % every == 0) or self.step == self.total_steps
            improved = False
            if evaluated and self.val_samples is not None:
                record.update(self.strategy.evaluation(self.step, lambda: evaluate(
                    self.model, self.val_samples, self.strategy, self.precision, self.stage, self.cfg.data.seed,
                    self.cfg.train.eval_batches)))
                self.watchdog.beat(self.step)  # an evaluation is a long phase of its own
                improved = self._observe_validation(record["val_loss"])
            if self.logger is not None:
                if evaluated or self.step % self.cfg.log.every == 0 or self.step == self.total_steps \
                        or result.stop_requested:
                    self.logger.log(record)
                self.logger.advance()
            if self.bad_steps_in_row >= self.cfg.train.max_bad_steps:
                self.say(f"error: {self.bad_steps_in_row} non-finite steps in a row (train.max_bad_steps): "
                         f"stopping; the last good checkpoint is kept in {ckpt.checkpoint_dir(self.run_dir)}")
                return 1
            patience = self.cfg.train.early_stop_patience
            stop_early = bool(patience) and self.val_loss.since_best >= patience
            every_ckpt = self.cfg.checkpoint.every
            final = self.step == self.total_steps or stop_early or result.stop_requested
            # An improving evaluation is checkpointed at once, so best.pt is exactly the best model.
            # Not in a run of skipped steps (the newest checkpoint stays the last good state),
            # except for a stop: resuming must continue exactly where this run ends.
            due = (every_ckpt and self.step % every_ckpt == 0) or final or improved
            if due and (self.bad_steps_in_row == 0 or result.stop_requested):
                saved = ckpt.save_training_state(self, is_best=improved)
                self.watchdog.beat(self.step)
                if final and not saved:
                    return 1  # the end of the run is not on disk: a scheduler must see a failure
            if result.stop_requested:
                self.say(f"stop requested (SIGTERM or SIGUSR1): checkpoint written at step {self.step}; exiting")
                return 0
            if stop_early:
                self.say(f"early stop at step {self.step}: no val improvement in {patience} evaluations "
                         f"(best {self.val_loss.best:.4f})")
                break
            for callback in self.step_callbacks:
                callback()
        self._finish()
        return 0

    def train_step(self) -> StepResult:
        """One optimizer step (``self.step`` is the caller's to advance): forward and backward
        of the step's micro-batches, exchange, clip, update."""
        stage = self.stage_at(self.step)
        if stage is not self.stage:
            self.enter_stage(stage)
        start = time.perf_counter()
        lr = self.schedule.apply(self.step - self.stage.start_step)
        self.model.train()
        accum = self.cfg.parallel.accum_steps
        micro_batches = [next(self.batches) for _ in range(accum)]
        loss_sum, finite = self.strategy.forward_backward(self.model, micro_batches, self.precision)
        flags = [loss_sum, 0.0 if finite else 1.0, 1.0 if self.stop_requested else 0.0]
        stats = self.strategy.finish_gradients(self.optimizer, torch.tensor(flags, dtype=torch.float64))
        grad_norm, skipped = self.strategy.update(self.optimizer, self.model, self.precision,
                                                  self.cfg.optim.grad_clip, nonfinite=stats[1].item() > 0)
        self.optimizer.zero_grad()  # Horovod's takes no set_to_none; torch's default is True
        # Losses come from the data-parallel replicas (the last stage of each pipeline). A step
        # with a non-finite loss on any rank has no loss to report (not the finite part's sum).
        loss = stats[0].item() / (self.dp_size * accum) if stats[1].item() == 0 else math.nan
        return StepResult(loss, grad_norm, lr, skipped, stats[2].item() > 0, time.perf_counter() - start,
                          self.dp_size * accum * self.stage.batch_size * self.stage.seq_len)

    def _observe_validation(self, val_loss: float) -> bool:
        improved = self.val_loss.observe(val_loss)
        if self.schedule.observe_val_loss(val_loss):
            self.say(f"val loss plateaued: lr scale now {self.schedule.plateau_scale:g}")
        return improved

    def say(self, message: str) -> None:
        """One line from the logging rank; warnings and errors go to stderr."""
        if self.is_main:
            (self.logger.write if self.logger is not None else print_line)(message)

    def _finish(self) -> None:
        if not self.is_main:
            return
        from hvdllm.train.report import plot_run, read_metrics, summarize

        records = read_metrics(self.run_dir)
        self.logger.close()  # the logging rank always has one
        self.logger = None
        print(summarize(records), flush=True)
        if self.cfg.log.plot:
            print(f"plot: {plot_run(records, self.run_dir / 'training.png')}", flush=True)
