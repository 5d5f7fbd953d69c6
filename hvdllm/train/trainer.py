"""The training loop: ``Trainer.train() -> run_steps() -> train_step()``.

The Trainer calls a :class:`~hvdllm.parallel.ParallelStrategy` and never branches on the
layout; what a user's input can break is checked in ``__init__`` before the first collective;
each step makes one exchange. docs/design/training-loop.md says why.
"""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import torch

from hvdllm.config import Config, config_to_toml
from hvdllm.data import DistributedBatches, ShardedSamples
from hvdllm.errors import UserError
from hvdllm.model.flops import flops_per_token
from hvdllm.optim import build_optimizer
from hvdllm.optim.plateau import BestTracker
from hvdllm.parallel import ParallelStrategy, Precision
from hvdllm.parallel.base import layout_phrase
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.evaluate import evaluate
from hvdllm.train.inputs import RunInputs, check_inputs
from hvdllm.train.metrics import StepResult, banner_lines, peak_flops, print_line, start_run_log, step_record
from hvdllm.train.phases import Phase, Phases, plan_phases
from hvdllm.train.resume_changes import resume_lines
from hvdllm.train.status import FINISHED, PREEMPTED, RUNNING, RunStatus
from hvdllm.train.training_state import MODEL_PARTS, Checkpointer, ModelParts, RankRNG
from hvdllm.train.warm_start import initial_model
from hvdllm.train.watchdog import StallWatchdog


class Trainer:
    def __init__(self, cfg: Config, strategy: ParallelStrategy, device: torch.device) -> None:
        self.cfg, self.strategy, self.device = cfg, strategy, device
        self.rank, self.dp_size = strategy.data_rank
        self.is_main = strategy.is_logging_rank
        self.run_dir = Path(cfg.train.run_dir)
        self.status = RunStatus(self.run_dir)
        self.stop_requested = False
        self.logger, self.watchdog = None, None
        self.hosts: list[str] = []
        self.peak_flops, self.peak_flops_source = 0.0, ""  # measured by the logging rank (start_log)
        self.step = 0
        self.bad_steps_in_row = 0
        self.step_callbacks: list = []  # after each step the loop goes on from, on every rank (elastic commits)
        inputs = check_inputs(cfg, device, self.dp_size)  # on every rank, before any collective
        self.gpt_cfg, self.tokenizer_json = inputs.gpt_cfg, inputs.tokenizer_json
        self.shard_seq_len = inputs.shard_seq_len
        resume_path, state = ckpt.resume_state(cfg, self.run_dir, vars(self.gpt_cfg), self.tokenizer_json, self.say,
                                               layout_problem=strategy.checkpoint_layout_problem)
        self._build(inputs, warm_start=state is None)
        if state is not None:
            saved = state.get("layout", {})
            problem = strategy.recut_problem(saved)  # on every rank, before any reads another shard
            if problem:
                raise UserError(f"{resume_path}: {problem}")
            self.resume(ckpt.state_for_rank(resume_path, state, strategy.checkpoint_shard, strategy.cuts_like(saved)))
            before, now = layout_phrase(saved), layout_phrase(strategy.checkpoint_layout())
            change = "" if before == now else f" (layout {before} -> {now})"
            self.say(f"resuming from {resume_path} at step {self.step}{change}")
            plateau = self.phases.schedule.plateau_scale if self.phases.schedule else 1.0
            for line in resume_lines(state["config_toml"], cfg, self.step, self.phases.plan, plateau, self.dp_size,
                                     inputs.shard_seq_len, self.gpt_cfg.block_size):
                self.say(line)
        # Under Horovod elastic a worker may join while the others sync, so the first
        # collective is the elastic State's (hvdllm/train/elastic.py), which starts the log.
        if not cfg.parallel.elastic:
            self.strategy.broadcast_state(self.model, self.optimizer)  # the first collective
            self.start_log(resumed=state is not None)

    def _build(self, inputs: RunInputs, warm_start: bool) -> None:
        """The model as the strategy cuts it, its optimizer, the data, and the parts a checkpoint saves."""
        cfg, strategy, plan = self.cfg, self.strategy, inputs.plan
        self.train_samples = ShardedSamples(cfg.data.path, "train", cfg.data.verify_checksums)
        self.val_samples = ShardedSamples(cfg.data.path, "val", cfg.data.verify_checksums) if inputs.has_val else None
        self.precision = Precision(cfg.train.precision, self.device)
        # Whole, before a strategy cuts it: every layout starts alike.
        model = initial_model(cfg, self.gpt_cfg, self.tokenizer_json, self.say, warm_start=warm_start)
        if cfg.train.compile:
            model.compile_blocks()
        self.num_params, n_dense = model.num_params(), model.num_params(non_embedding=True)
        self.model = strategy.parallelize(model, self.device)
        self.optimizer = strategy.wrap_optimizer(build_optimizer(self.model, cfg.optim, plan[0].lr), self.model)
        self.phases = Phases(plan, self._open_loader, self.optimizer)
        self.val_loss = BestTracker()  # for early stopping, over the whole run
        g = self.gpt_cfg
        self.flops_per_token = {p.index: flops_per_token(n_dense, g.n_layer, g.n_head, g.d_model // g.n_head,
                                                         p.seq_len) for p in plan}
        parts = {MODEL_PARTS: ModelParts(strategy, self.model, self.optimizer), "phase": self.phases,
                 "val_loss": self.val_loss, "rng": RankRNG(strategy, self.device)}
        if self.precision.scaler is not None:
            parts["scaler"] = self.precision.scaler
        facts = {"config_toml": config_to_toml(cfg), "model_config": vars(self.gpt_cfg),
                 "tokenizer_json": self.tokenizer_json}
        self.checkpointer = Checkpointer(parts, strategy, self.run_dir, cfg.checkpoint, facts, self.say)

    def _open_loader(self, phase: Phase) -> DistributedBatches:
        data = self.cfg.data
        return DistributedBatches(self.train_samples, *self.strategy.train_slice(phase.batch_size),
                                  seed=data.seed + phase.index, shuffle=data.shuffle, seq_len=phase.seq_len,
                                  random_offset=data.random_offset, prefetch=data.prefetch)

    @property
    def total_steps(self) -> int:
        return self.phases.total_steps

    def resume(self, state: dict) -> None:
        """Every part where the checkpoint ``state`` left it; the data position is checked now,
        on every rank, so one that cannot resume is a one-line error before any collective."""
        self.step = self.checkpointer.load(state)
        if self.step < self.total_steps:
            self.phases.advance_to(self.step)

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
        self.status.write(RUNNING, self.step)

    def adopt_world(self) -> None:
        """After the strategy's world changed (Horovod elastic): this rank's data slice, the
        phases' batch sizes and lr (the config's world-size rule). The caller resumes a state
        next, which enters the phase at its data position."""
        self.rank, self.dp_size = self.strategy.data_rank
        self.is_main = self.strategy.is_logging_rank
        self.phases.replan(plan_phases(self.cfg, self.dp_size, self.shard_seq_len, self.gpt_cfg.block_size))

    def request_stop(self, *_args) -> None:
        """SIGTERM (or SIGUSR1) handler: finish the current step, checkpoint, exit 0 (all ranks agree)."""
        self.stop_requested = True

    # --- the loop --------------------------------------------------------------------------
    def train(self, loop=None) -> int:
        """Run to the end (or an early stop, a preemption, too many bad steps); exit status.
        ``loop`` runs the steps instead of :meth:`run_steps` (Horovod elastic wraps it)."""
        layout = self.strategy.layout
        self.watchdog = StallWatchdog(self.cfg.train.stall_timeout_s, self.strategy.coords.rank, layout.world_size,
                                      awaited=self.strategy.awaited_peers(),
                                      role=self.strategy.coords.role if layout.servers else "", status=self.status)
        try:
            return (loop or self.run_steps)()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the watchdog and the loader's reader thread and flush the logs."""
        if self.watchdog is not None:
            self.watchdog.close()
        self.phases.close()
        if self.logger is not None:
            self.logger.close()

    def run_steps(self) -> int:
        cfg = self.cfg.train
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
            evaluated = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps
            improved = bool(evaluated) and self._evaluate_into(record)
            if self.logger is not None:
                if evaluated or self.step % self.cfg.log.every == 0 or self.step == self.total_steps \
                        or result.stop_requested:
                    self.logger.log(record)
                self.logger.advance()
            if self.bad_steps_in_row >= cfg.max_bad_steps:
                line = (f"error: {self.bad_steps_in_row} non-finite steps in a row (train.max_bad_steps): "
                        f"stopping; the last good checkpoint is kept in {ckpt.checkpoint_dir(self.run_dir)}")
                self.say(line)
                self._record_failure(line)
                return 1
            stop_early = bool(cfg.early_stop_patience) and self.val_loss.since_best >= cfg.early_stop_patience
            final = self.step == self.total_steps or stop_early or result.stop_requested
            saved = self.checkpointer.save_if_due(self.step, final, improved, self.bad_steps_in_row,
                                                  result.stop_requested)
            self.watchdog.beat(self.step)
            if final and not saved:  # the end of the run is not on disk: a scheduler must see a failure
                self._record_failure(f"error: the run's last checkpoint (step {self.step}) was not written "
                                     f"(the rank that failed to write it said why on stderr)")
                return 1
            if result.stop_requested:
                self.say(f"stop requested (SIGTERM or SIGUSR1): checkpoint written at step {self.step}; exiting")
                self._record(PREEMPTED)
                return 0
            if stop_early:
                self.say(f"early stop at step {self.step}: no val improvement in {cfg.early_stop_patience} "
                         f"evaluations (best {self.val_loss.best:.4f})")
                break
            for callback in self.step_callbacks:
                callback()
        self._finish()
        self._record(FINISHED)
        return 0

    def _record(self, state: str) -> None:
        """The run's outcome in its status.json, written by the logging rank (the run folder's)."""
        if self.is_main:
            self.status.write(state, self.step)

    def _record_failure(self, line: str) -> None:
        if self.is_main:
            self.status.failed(line)

    def train_step(self) -> StepResult:
        """One optimizer step (``self.step`` is the caller's to advance): forward and backward
        of the step's accumulation batches, exchange, clip, update."""
        self.phases.advance_to(self.step)
        phase = self.phases.current
        start = time.perf_counter()
        lr = self.phases.schedule.apply(self.step - phase.start_step)
        self.model.train()
        accum = self.cfg.parallel.accum_steps
        accum_batches = [next(self.phases.batches) for _ in range(accum)]
        loss_sum, finite = self.strategy.forward_backward(self.model, accum_batches, self.precision)
        flags = [loss_sum, 0.0 if finite else 1.0, 1.0 if self.stop_requested else 0.0]
        stats = self.strategy.finish_gradients(self.optimizer, torch.tensor(flags, dtype=torch.float64))
        grad_norm, skipped = self.strategy.update(self.optimizer, self.model, self.precision,
                                                  self.cfg.optim.grad_clip, nonfinite=stats[1].item() > 0)
        self.optimizer.zero_grad()  # Horovod's takes no set_to_none; torch's default is True
        # Losses come from the data-parallel replicas (the last stage of each pipeline). A step
        # with a non-finite loss on any rank has no loss to report (not the finite part's sum).
        loss = stats[0].item() / (self.dp_size * accum) if stats[1].item() == 0 else math.nan
        return StepResult(loss, grad_norm, lr, skipped, stats[2].item() > 0, time.perf_counter() - start,
                          self.dp_size * accum * phase.batch_size * phase.seq_len)

    def _evaluate_into(self, record: dict) -> bool:
        """Collective: the validation metrics into ``record``; whether the loss is the best so far."""
        if self.val_samples is None:
            return False
        record.update(self.strategy.evaluation(self.step, lambda: evaluate(
            self.model, self.val_samples, self.strategy, self.precision, self.phases.current, self.cfg.data.seed,
            self.cfg.train.eval_batches)))
        self.watchdog.beat(self.step)  # an evaluation is a long phase of its own
        val_loss = record["val_loss"]
        improved = self.val_loss.observe(val_loss)
        if self.phases.schedule.observe_val_loss(val_loss):
            self.say(f"val loss plateaued: lr scale now {self.phases.schedule.plateau_scale:g}")
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
