"""A parameter server's loop: receive pushes from any worker, apply them, answer with
parameters once the staleness bound allows (the protocol is described in param_server.py,
its messages in ps_protocol.py).

The server builds the same seeded model as every worker (so version 0 is the workers'
initial weights), keeps its shard of the parameters as views of one flat float32 buffer (the
optimizer updates them in place, and a reply is that buffer's bytes), and frees the rest.
It runs until every worker has said DONE. On CHECKPOINT(N) from worker 0 it writes its shard
once every live worker's first N pushes are in, and answers; on resume it reads that shard.
SIGTERM or SIGUSR1 (what mpirun forwards) asks the workers to stop at a clock they can all
still reach; they checkpoint and say DONE. Server 0 also gathers the workers' collectives.

The loop polls (a matched probe, then a short sleep) rather than blocking in a receive: it
must notice a silent worker, and a blocking receive in Open MPI spins on a core the workers
may need.
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from hvdllm.atomic import write_text_atomic
from hvdllm.config import config_to_toml
from hvdllm.data.shards import read_manifest, read_tokenizer_json
from hvdllm.model import gpt_config_from
from hvdllm.optim import LRSchedule, build_optimizer
from hvdllm.parallel.load_balance import BatchSplitter
from hvdllm.parallel.ps_protocol import (CHECKPOINT, DONE, EMPTY, END, EVALUATE, GATHER, H_APPLIED, H_COUNT, H_DEAD,
                                         H_DROPPED, H_HIST, H_LOSS, H_NONFINITE, H_NORM, H_SPAN_COUNT, H_SPAN_START,
                                         H_STOP, H_STOP_AT, H_UPDATES, H_VERSION, HEARTBEAT, KINDS, PUSH, SERVER_SHARD,
                                         S_LOSS, S_NONFINITE, S_SAMPLES, S_SECONDS, S_STOP, STATS, header_size,
                                         shard_ranges, silent_workers, tag)
from hvdllm.train import checkpoint as ckpt
from hvdllm.train.stages import plan_stages
from hvdllm.train.warm_start import initial_model
from hvdllm.comm.mpi import abort_job

POLL_S = 2e-4  # the sleep between two probes of an idle server: well below a step's time


class ParameterServer:
    def __init__(self, cfg, layout, coords, p2p, servers_comm) -> None:
        self.cfg, self.p2p, self.servers_comm = cfg, p2p, servers_comm
        self.index = coords.rank - layout.workers
        self.workers = layout.workers
        self.s = cfg.parallel.max_staleness
        manifest = read_manifest(cfg.data.path)
        gpt_cfg = self.gpt_cfg = gpt_config_from(cfg.model, vocab_size=manifest["vocab_size"])
        stage = plan_stages(cfg, layout.data, manifest["seq_len"], gpt_cfg.block_size)[0]
        tokenizer_json = read_tokenizer_json(cfg.data.path, manifest)
        path, _ = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.train.run_dir)
        # As the Trainer does: the same initial weights (none to read when a shard is resumed).
        model = initial_model(cfg, gpt_cfg, tokenizer_json, warm_start=path is None)
        params = [p for p in model.parameters() if p.requires_grad]
        start, end = shard_ranges([p.numel() for p in params], layout.servers)[self.index]
        shard = params[start:end]
        n = sum(p.numel() for p in shard)
        self.head = header_size(self.s)
        self.reply = torch.zeros(self.head * 8 + 4 * n, dtype=torch.uint8)
        self.header = self.reply[:self.head * 8].view(torch.float64)
        self.flat = self.reply[self.head * 8:].view(torch.float32)  # the master weights, sent as they are
        self.grad = torch.zeros(n, dtype=torch.float32)
        self.accumulated = torch.zeros(n, dtype=torch.float64)  # s = 0: the clock's gradient sum
        self.incoming = torch.empty(STATS * 8 + 4 * n, dtype=torch.uint8)
        offset = 0
        with torch.no_grad():
            for param in shard:
                view = self.flat[offset:offset + param.numel()].view_as(param)
                view.copy_(param)
                param.data, param.grad = view, self.grad[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
        self.optimizer = build_optimizer(model, cfg.optim, stage.lr)
        mine = {id(p) for p in shard}
        for group in self.optimizer.param_groups:  # same groups (decay or not) as a replica's
            group["params"] = [p for p in group["params"] if id(p) in mine]
        for param in params:
            if id(param) not in mine:
                param.data = torch.empty(0)  # the server keeps its shard only
        self.schedule = LRSchedule(self.optimizer, stage.lr, stage.steps, stage.schedule)
        self.run_dir = Path(cfg.train.run_dir)
        # Progress: pushes per worker (its clock), the clocks' statistics, who waits for what.
        self.pushed = [0] * self.workers
        self.done: set[int] = set()  # said DONE or declared dead
        self.dead: list[int] = []
        self.sending: list = []  # (worker, request, payload) of the sends not known to be done
        self.abandoned: list = []  # (request, buffer) of receives from workers that died sending
        self.last_heard = {w: time.monotonic() for w in range(self.workers)}
        self.silence_checked = time.monotonic()
        self.gathers: dict[int, dict[int, bytes]] = defaultdict(dict)  # server 0: round -> worker -> part
        self.snapshots: dict[int, tuple] = {}  # step -> (reply bytes to evaluate, workers served)
        self.waiting: dict[int, tuple[int, float]] = {}  # worker -> (clock wanted, since)
        self.sent_version = [0] * self.workers
        # Per clock: loss, non-finite, stop (summed), the pushes' weights (their samples under
        # parallel.load_balance, else 1 each: the mean divides by these) and the pushes.
        self.clock_stats = defaultdict(lambda: [0.0] * 5)
        self.pushers: dict[int, set[int]] = defaultdict(set)  # s = 0: who pushed the open clock
        self.norms: dict[int, float] = {}
        self.updates = self.applied = self.dropped = 0
        self.hist = [0] * (self.s + 1)
        self.stop_at = -1
        self.stop_signalled = False
        self.idle_s = self.queue_s = self.queue_max_s = 0.0
        self.replies = 0
        self.checkpoint_due: int | None = None  # the step worker 0 asked to checkpoint
        # Each worker's span of a clock's global batch: by speed with parallel.load_balance
        # (server 0 decides; the workers read its header).
        self.splitter = BatchSplitter(layout.workers * stage.batch_size, self.workers,
                                      cfg.parallel.load_balance and self.index == 0)
        if path is not None:
            self._load(ckpt.load_checkpoint(ckpt.shard_path(path, SERVER_SHARD + self.index)))

    def _state(self, step: int) -> dict:
        return {"model": {"flat": self.flat.clone()}, "optimizer": self.optimizer.state_dict(), "step": step,
                "counters": {"updates": self.updates, "applied": self.applied, "dropped": self.dropped,
                             "hist": list(self.hist)},
                "config_toml": config_to_toml(self.cfg), "model_config": vars(self.gpt_cfg)}

    def _load(self, state: dict) -> None:
        with torch.no_grad():
            self.flat.copy_(state["model"]["flat"])
        self.optimizer.load_state_dict(state["optimizer"])
        counters = state["counters"]
        self.updates, self.applied, self.dropped = counters["updates"], counters["applied"], counters["dropped"]
        self.hist = list(counters["hist"])
        self.pushed = [int(state["step"])] * self.workers  # every worker checkpointed at this clock
        self.sent_version = list(self.pushed)

    def _checkpoint_if_due(self) -> None:
        """Write the shard once every live worker's first N pushes are in, then tell worker 0."""
        step = self.checkpoint_due
        if step is None or self.version < step:
            return
        ckpt.save_checkpoint(self._state(step), self.run_dir, step, self.cfg.checkpoint.keep_last, False,
                             SERVER_SHARD + self.index)
        self._send(EMPTY, 0, tag(step, CHECKPOINT))
        self.checkpoint_due = None

    @property
    def version(self) -> int:
        """Clocks complete: every live worker has pushed them (all applied, for s = 0)."""
        live = [self.pushed[w] for w in range(self.workers) if w not in self.done]
        return min(live) if live else max(self.pushed)

    @property
    def live(self) -> set[int]:
        return set(range(self.workers)) - self.done

    def serve(self) -> int:
        from mpi4py import MPI

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        status, started = MPI.Status(), time.perf_counter()
        while len(self.done) < self.workers:
            message = self._next_message(status)
            if message is None:  # a worker was declared dead: see what that released
                self._progress()
                continue
            worker, (clock, kind) = status.Get_source(), divmod(status.Get_tag(), KINDS)
            size = status.Get_count(MPI.BYTE)
            buffer = self.incoming if size <= len(self.incoming) else torch.empty(size, dtype=torch.uint8)
            if not self._receive(message, buffer, worker):
                self._progress()  # its sender died in the middle of it and was declared dead
                continue
            self.last_heard[worker] = time.monotonic()
            if worker in self.dead:
                self._send_end(worker)  # it was only stopped or slow, and has woken: it must go
                continue
            if kind == HEARTBEAT:
                continue
            if kind == DONE:
                self.done.add(worker)
            elif kind == CHECKPOINT:
                self.checkpoint_due = clock
            elif kind == GATHER:
                self.gathers[clock][worker] = buffer[:size].numpy().tobytes()
            elif kind == EVALUATE:
                self._send_snapshot(worker, clock)
            elif size == STATS * 8:  # a pull with no gradient: a worker's start
                self.waiting[worker] = (clock, time.perf_counter())
            else:
                self._push(worker, clock)
                self.waiting[worker] = (clock + 1, time.perf_counter())
            self._progress()
        for worker, request, _ in self.sending:
            if worker not in self.dead:
                request.Wait()
        self._write_summary(time.perf_counter() - started)
        if len(self.dead) == self.workers:
            print(f"error: server {self.index}: every worker died", file=sys.stderr, flush=True)
            return 1
        return 0

    def _receive(self, message, buffer: torch.Tensor, worker: int) -> bool:
        """Receive a matched message, polling: a large one streams from its sender, and a
        worker killed in the middle of sending it would hold a blocking receive for ever. If
        the sender falls silent meanwhile it is declared dead and False returned; the
        receive then stays pending for ever, so the buffer is left to it."""
        from mpi4py import MPI

        request = message.Irecv([buffer.numpy(), MPI.BYTE])
        while not request.Test():
            if silent_workers({worker: self.last_heard[worker]}, self.cfg.parallel.worker_timeout_s):
                self._declare_dead([worker])
                if buffer is self.incoming:
                    self.incoming = torch.empty_like(self.incoming)
                self.abandoned.append((request, buffer))
                return False
            time.sleep(POLL_S)
        return True

    def _send(self, payload, worker: int, tag_: int) -> None:
        """Every send of the server is non-blocking and kept until done: a large message waits
        for its receiver, and one to a worker that died would hold the server for ever."""
        from mpi4py import MPI

        self.sending.append((worker, self.p2p.Isend([payload, MPI.BYTE], dest=worker, tag=tag_), payload))

    def _progress(self) -> None:
        """Whatever the last message or death allows: a clock's update, replies, gathers, a checkpoint."""
        self.sending = [(w, request, payload) for w, request, payload in self.sending if not request.Test()]
        if self.s == 0 and self.pushers and self.live <= next(iter(self.pushers.values())):
            self._apply_clock(next(iter(self.pushers)))
        self._answer()
        self._answer_gathers()
        self._checkpoint_if_due()

    def _next_message(self, status):
        """The next message (matched, not yet received), or None after declaring a worker dead.
        Silence is judged only with the queue drained: after a long checkpoint write or norm
        allreduce of this server's own, the heartbeats that came meanwhile are still unread."""
        from mpi4py import MPI

        while True:
            message = self.p2p.Improbe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if message is not None:
                return message
            if time.monotonic() - self.silence_checked > 1.0:
                self.silence_checked = time.monotonic()
                silent = silent_workers({w: self.last_heard[w] for w in self.live}, self.cfg.parallel.worker_timeout_s)
                if silent:
                    self._declare_dead(silent)
                    return None
            time.sleep(POLL_S)
            self.idle_s += POLL_S

    def _declare_dead(self, workers: list[int]) -> None:
        timeout = self.cfg.parallel.worker_timeout_s
        names = ", ".join(f"rank {w}" for w in workers)
        if not self.cfg.parallel.continue_without_dead or 0 in workers:
            why = " (worker 0 writes the log and checkpoints)" if self.cfg.parallel.continue_without_dead else ""
            print(f"error: server {self.index}: worker {names} sent nothing for {timeout:g} s "
                  f"(parallel.worker_timeout_s): dead or stopped; ending the job{why}", file=sys.stderr, flush=True)
            self._end_job(sorted(self.live - set(workers)))
        self.dead += workers
        self.done.update(workers)
        for worker in workers:
            self.waiting.pop(worker, None)
            self._send_end(worker)  # a stopped one that wakes reads it in its heartbeat thread and exits
        for step, (_, served) in list(self.snapshots.items()):
            if self.live <= served:
                del self.snapshots[step]
        print(f"warning: server {self.index}: worker {names} sent nothing for {timeout:g} s: going on with "
              f"{len(self.live)} workers (parallel.continue_without_dead)", file=sys.stderr, flush=True)

    def _send_end(self, worker: int) -> None:
        self._send(EMPTY, worker, tag(0, END))

    def _end_job(self, survivors: list[int]) -> None:
        """Tell the workers still heard to exit (under --enable-recovery MPI_Abort ends only
        the caller), then abort (under a plain mpirun that ends every rank at once). Their
        END messages are small, so the sends complete locally; none goes to a silent worker,
        whose link may be down."""
        from mpi4py import MPI

        MPI.Request.Waitall([self.p2p.Isend([EMPTY, MPI.BYTE], dest=w, tag=tag(0, END)) for w in survivors])
        abort_job()

    def _send_snapshot(self, worker: int, step: int) -> None:
        """The weights to evaluate at ``step``: as they were when the first worker asked, for
        every worker (one copy, dropped once every live worker has had it)."""
        if step not in self.snapshots:
            self._fill_header(step)
            self.snapshots[step] = (self.reply.numpy().copy(), set())
        snapshot, served = self.snapshots[step]
        self._send(snapshot, worker, tag(step, EVALUATE))
        served.add(worker)
        if self.live <= served:
            del self.snapshots[step]

    def _on_signal(self, *_args) -> None:
        self.stop_signalled = True

    def _push(self, worker: int, clock: int) -> None:
        stats = self.incoming[:STATS * 8].view(torch.float64).tolist()
        gradient = self.incoming[STATS * 8:].view(torch.float32)
        self.pushed[worker] = clock + 1
        weight = stats[S_SAMPLES] if self.cfg.parallel.load_balance else 1.0
        totals = self.clock_stats[clock]
        for i, value in enumerate((stats[S_LOSS], stats[S_NONFINITE], stats[S_STOP], weight, 1.0)):
            totals[i] += value
        self.splitter.pushed(worker, int(stats[S_SAMPLES]), stats[S_SECONDS])
        if (stats[S_STOP] > 0 or self.stop_signalled) and self.stop_at < 0:
            self.stop_at = max(self.pushed) + 1  # a clock no worker has passed: all can stop there
        finite = stats[S_NONFINITE] == 0 and bool(torch.isfinite(gradient).all())
        staleness = clock - self.sent_version[worker]
        if self.s == 0:  # applied by _progress once every live worker has pushed this clock
            if finite:
                self.accumulated += gradient
            self.pushers[clock].add(worker)
        elif finite:
            lr = self.schedule.lr_at(self.version) / (self.workers - len(self.dead))
            if self.cfg.parallel.staleness_lr:
                lr /= max(1, staleness)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.grad.copy_(gradient)
            self.optimizer.step()
            self.updates += 1
            self.applied += 1
            self.hist[staleness] += 1
        else:
            self.dropped += 1

    def _apply_clock(self, clock: int) -> None:
        """s = 0: one step on the mean of the clock's pushes, clipped by the global norm of
        that mean (the servers sum their shards' squares), as ``sync`` takes it."""
        from mpi4py import MPI

        del self.pushers[clock]
        self.splitter.rebalance(self.live)
        totals = self.clock_stats[clock]
        pushes = int(totals[4])
        mean = (self.accumulated / totals[3]).float()  # pushes arrive weighted
        self.accumulated.zero_()
        square = self.servers_comm.allreduce(mean.double().square().sum().item(), op=MPI.SUM)
        norm = math.sqrt(square) if math.isfinite(square) else math.inf
        self.norms[clock] = norm
        clip = self.cfg.optim.grad_clip
        if totals[1] > 0 or not math.isfinite(norm):
            self.dropped += pushes  # as sync skips the step
            return
        coefficient = (clip or math.inf) / (norm + 1e-6)
        self.grad.copy_(mean * coefficient if coefficient < 1.0 else mean)
        self.schedule.apply(clock)
        self.optimizer.step()
        self.updates += 1
        self.applied += pushes
        self.hist[0] += pushes

    def _fill_header(self, wanted: int, worker: int | None = None) -> None:
        """The reply header for a worker that will compute clock ``wanted`` next."""
        totals = self.clock_stats.get(wanted - 1, [0.0] * 5)
        start, count = self.splitter.span(worker)
        fields = {H_VERSION: self.version, H_UPDATES: self.updates, H_APPLIED: self.applied,
                  H_DROPPED: self.dropped, H_STOP_AT: self.stop_at, H_LOSS: totals[0], H_NONFINITE: totals[1],
                  H_STOP: totals[2], H_COUNT: totals[3], H_NORM: self.norms.get(wanted - 1, math.nan),
                  H_DEAD: len(self.dead), H_SPAN_START: start, H_SPAN_COUNT: count}
        for index, value in fields.items():
            self.header[index] = value
        self.header[H_HIST:] = torch.tensor(self.hist, dtype=torch.float64)

    def _answer(self) -> None:
        """Reply to every waiting worker whose next clock the staleness bound now allows."""
        version = self.version
        for worker, (wanted, since) in list(self.waiting.items()):
            if version < wanted - self.s:
                continue
            self._fill_header(wanted, worker)
            self._send(self.reply.numpy().copy(), worker, tag(wanted, PUSH))  # a copy: the weights move on
            self.sent_version[worker] = version
            del self.waiting[worker]
            held = time.perf_counter() - since
            self.queue_s += held
            self.queue_max_s = max(self.queue_max_s, held)
            self.replies += 1
        for old in [c for c in self.clock_stats if c < version - 1]:
            del self.clock_stats[old]  # every reply that could need it has been sent

    def _answer_gathers(self) -> None:
        """Server 0: send each complete round of the workers' collective back to its live workers."""
        for round_, parts in list(self.gathers.items()):
            if not self.live <= parts.keys():
                continue
            reply = pickle.dumps([parts[w] for w in sorted(parts) if w not in self.dead])
            for worker in sorted(self.live & parts.keys()):
                self._send(reply, worker, tag(round_, GATHER))
            del self.gathers[round_]

    def _write_summary(self, elapsed_s: float) -> None:
        summary = {"server": self.index, "updates": self.updates, "applied_pushes": self.applied,
                   "dropped_pushes": self.dropped, "staleness_hist": self.hist, "max_staleness": self.s,
                   "dead_workers": self.dead,
                   "pushes_per_worker": self.pushed,
                   "samples_per_worker": self.splitter.samples,
                   "pushes_per_s_per_worker": [p / elapsed_s for p in self.pushed],
                   "queue_s_mean": self.queue_s / max(1, self.replies), "queue_s_max": self.queue_max_s,
                   "idle_s": self.idle_s, "elapsed_s": elapsed_s}
        folder = self.run_dir / "servers"
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"server-{self.index}.json", json.dumps(summary, indent=1) + "\n")
