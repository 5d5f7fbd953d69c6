"""A parameter server's MPI pump: receive each message from any worker, hand it to the state
machine (ps_state.py), send what it returns; notice silent workers; at the end write the
server's summary, over hvdllm.comm's tagged byte messages.

It polls (a matched probe, then a short sleep) rather than blocking in a receive: it must
notice a silent worker, and a blocking receive in Open MPI spins on a core the workers may
need. Every send is non-blocking and kept until done: a large message waits for its
receiver, and one to a worker that died would hold the server for ever.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import torch

from hvdllm.atomic import write_text_atomic
from hvdllm.comm.messages import Incoming, Messages, wait_all
from hvdllm.parallel.load_balance import BatchSplitter
from hvdllm.parallel.ps_protocol import HEADERS, PUSH_HEADER, Kind, encode, header_view, silent_workers
from hvdllm.parallel.ps_shard import ServerSetup, ServerShard
from hvdllm.parallel.ps_state import Send, ServerState

POLL_S = 2e-4  # the sleep between two probes of an idle server: well below a step's time


class ParameterServer:
    """Server ``index``: its shard and state machine, fed from ``p2p`` (the protocol's
    communicator); ``servers_comm`` joins the servers alone (the s = 0 global norm)."""

    def __init__(self, cfg, setup: ServerSetup, index: int, workers: int, servers: int, p2p: Messages,
                 servers_comm: Messages) -> None:
        self.cfg, self.setup, self.index, self.p2p = cfg, setup, index, p2p
        shard = ServerShard(setup, cfg.optim, index, servers, servers_comm.sum)
        # Each worker's span of a clock's global batch: by speed with parallel.load_balance
        # (server 0 decides; the workers read its replies).
        splitter = BatchSplitter(workers * setup.batch_size, workers, cfg.parallel.load_balance and index == 0)
        self.state = ServerState(shard, workers, cfg.parallel, splitter, setup.save)
        if setup.resumed is not None:
            self.state.load_state_dict(setup.resumed)
        self.incoming = torch.empty(PUSH_HEADER.itemsize + 4 * shard.weights.numel(), dtype=torch.uint8)
        self.sending: list = []  # (worker, request, message) of the sends not known to be done
        self.abandoned: list = []  # (request, buffer) of receives from workers that died sending
        self.last_heard = {w: time.monotonic() for w in range(workers)}
        self.silence_checked = time.monotonic()
        self.idle_s = 0.0

    def serve(self) -> int:
        """Until every worker has said DONE or died; 0, or 1 when every worker died."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda *_: self.state.request_stop())
        started = time.perf_counter()
        while not self.state.finished:
            self._post(self._next())
            self.sending = [entry for entry in self.sending if not entry[1].Test()]
        for worker, request, _ in self.sending:
            if worker not in self.state.dead:
                request.Wait()
        self._write_summary(time.perf_counter() - started)
        if len(self.state.dead) == self.state.workers:
            print(f"error: server {self.index}: every worker died", file=sys.stderr, flush=True)
            return 1
        return 0

    def _next(self) -> list[Send]:
        """Wait for the next message and hand it to the state machine, or declare silent
        workers dead; returns what to send. Silence is judged only with the queue drained:
        after a long checkpoint write or norm allreduce of this server's own, the heartbeats
        that came meanwhile are still unread."""
        while True:
            message = self.p2p.poll()
            if message is not None:
                return self._take(message)
            if time.monotonic() - self.silence_checked > 1.0:
                self.silence_checked = time.monotonic()
                timeout = self.cfg.parallel.worker_timeout_s
                silent = silent_workers({w: self.last_heard[w] for w in self.state.live}, timeout)
                if silent:
                    return self._declare_dead(silent)
            time.sleep(POLL_S)
            self.idle_s += POLL_S

    def _take(self, message: Incoming) -> list[Send]:
        """Receive a matched message, polling: a large one streams from its sender, and a
        worker killed in the middle of sending it would hold a blocking receive for ever. If
        the sender falls silent meanwhile it is declared dead; the receive then stays
        pending for ever, so the buffer is left to it."""
        worker, kind, size = message.source, Kind(message.tag), message.size
        buffer = self.incoming if size <= len(self.incoming) else torch.empty(size, dtype=torch.uint8)
        request = message.receive_into(buffer.numpy())
        while not request.Test():
            if silent_workers({worker: self.last_heard[worker]}, self.cfg.parallel.worker_timeout_s):
                if buffer is self.incoming:
                    self.incoming = torch.empty_like(self.incoming)
                self.abandoned.append((request, buffer))
                return self._declare_dead([worker])
            time.sleep(POLL_S)
        self.last_heard[worker] = time.monotonic()
        dtype = HEADERS.get(kind)
        header = None if dtype is None else header_view(buffer, dtype)
        return self.state.receive(worker, kind, header, buffer[0 if dtype is None else dtype.itemsize:size])

    def _declare_dead(self, workers: list[int]) -> list[Send]:
        sends = self.state.on_timeout(workers)
        timeout = self.cfg.parallel.worker_timeout_s
        names = ", ".join(f"rank {w}" for w in workers)
        if self.state.ending:
            why = " (worker 0 writes the log and checkpoints)" if self.cfg.parallel.continue_without_dead else ""
            line = (f"error: server {self.index}: worker {names} sent nothing for {timeout:g} s "
                    f"(parallel.worker_timeout_s): dead or stopped; ending the job{why}")
            print(line, file=sys.stderr, flush=True)
            # Under --enable-recovery MPI_Abort ends only the caller: the workers still heard
            # exit on END first. END is small, so these sends complete locally; none goes to a
            # silent worker, whose link may be down.
            wait_all(self._post(sends))
            self.setup.end_job(line)
        print(f"warning: server {self.index}: worker {names} sent nothing for {timeout:g} s: going on with "
              f"{len(self.state.live)} workers (parallel.continue_without_dead)", file=sys.stderr, flush=True)
        return sends

    def _post(self, sends: list[Send]) -> list:
        """Start every send at once (each a copy of its header and body: the weights move
        on); returns their requests."""
        requests = []
        for send in sends:
            message = encode(send.header, send.body)
            requests.append(self.p2p.isend(message, dest=send.worker, tag=int(send.kind)))
            self.sending.append((send.worker, requests[-1], message))
        return requests

    def _write_summary(self, elapsed_s: float) -> None:
        summary = {"server": self.index, **self.state.summary(),
                   "pushes_per_s_per_worker": [p / elapsed_s for p in self.state.pushed],
                   "idle_s": self.idle_s, "elapsed_s": elapsed_s}
        folder = Path(self.cfg.train.run_dir) / "servers"
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"server-{self.index}.json", json.dumps(summary, indent=1) + "\n")
