"""Asynchronous data parallelism: a sharded parameter server with bounded staleness (SSP).

Roles (hvdllm/parallel/layout.py). The first ``W`` ranks are workers, the last
``parallel.servers = S`` ranks are servers. The model's parameters, in ``model.parameters()``
order, form one flat vector cut at parameter boundaries into ``S`` contiguous ranges of
about equal bytes (:func:`shard_ranges`); server ``k`` holds range ``k`` as master weights
with its optimizer state (AdamW, LAMB, Adafactor from ``build_optimizer``, same parameter
groups as a replica would have), so a per-tensor optimizer (LAMB's trust ratio, Adafactor's
factored moments) acts on whole tensors.

Who talks to whom. Servers never enter the Trainer: ``run.py`` sends them into
:func:`hvdllm.parallel.server_loop.serve`. Everything travels over mpi4py on a duplicate of
COMM_WORLD, gradients and parameters as raw bytes of flat contiguous buffers (numpy views
of torch storage, never pickled; the protocol is in ps_protocol.py). Horovod is not started: the workers' own
collectives (the evaluation's sums, the checkpoint's RNG states) are gathered by server 0
from the workers alive, so that no worker ever waits on one that died.

One step of worker ``w`` at clock ``c`` (its own step count): forward and backward on its own
data slice (its span, under load balancing); then :meth:`finish_gradients` sends one PUSH per
server (``[5 x float64 statistics | float32 gradient shard]``, non-blocking sends) and waits
for each server's reply, ``[header | float32 parameter shard]``, the parameters it computes
clock ``c + 1`` on; :meth:`update` copies them into the model. The replies are the pulls: a server answers the
push of clock ``c`` as soon as every live worker has pushed clock ``c - s`` (``s =
parallel.max_staleness``), so no worker ever computes on parameters missing more than ``s``
clocks of the others' updates (Ho et al. 2013). The staleness of a push is the number of
clocks its parameters missed: ``c - (clocks complete when they were sent)``, in ``[0, s]``.

What an update is (the global order).
- ``s = 0``: a server adds up the ``W`` pushes of clock ``c`` as they arrive (any source) and
  then takes one optimizer step on their mean, clipped by the global norm of the mean (the
  servers sum their shards' squared norms on their own communicator); the clock is skipped
  when any push had a non-finite loss or the norm is not finite. That is ``sync``'s order
  exactly: the same losses for the same global batch.
- ``s > 0``: each push is applied on arrival as its own optimizer step, clipped by the
  worker to ``optim.grad_clip`` (its own gradient's norm), at ``lr / W`` (the workers alive)
  so that a clock of ``W`` pushes moves the weights about as far as one synchronous step, and further divided
  by the push's staleness with ``parallel.staleness_lr`` (Zhang et al. 2016). A push with a
  non-finite loss or gradient is dropped and counted, never applied.
In both, the LR schedule follows the server's count of complete clocks.

Load balancing (``parallel.load_balance``, s = 0 only; load_balance.py). A clock's update is
the mean over its global batch, whoever computed which sample, so every worker reads the
whole global batch and computes only the span of it that server 0's last reply named
(``H_SPAN_START``, ``H_SPAN_COUNT``). A push carries the samples it computed and the seconds
its forward and backward took; the servers weight each gradient by its samples and divide the
clock's sum by theirs (the mean over every sample computed, also in a clock a worker died
in), and server 0 sizes the next clock's spans by the seconds per sample: a persistently slow
worker computes fewer samples, and the update stays ``sync``'s (with loss masks each sample's
mean counts alike, where ``sync`` weighs each worker's slice alike).

Evaluation. At an evaluation step every worker asks the servers for the weights to evaluate:
each server answers every worker with one snapshot of its shard, taken when the first worker
asked, so all evaluate the same weights, the servers' (for s = 0 exactly those of the
clock), on their own val slices and their own devices; server 0 gathers the sums.

Checkpoints. The Trainer checkpoints every worker at the same step N (its RNG gather is a
collective of the workers), so at that moment every worker has pushed exactly N clocks.
Worker 0, asked for its state, sends CHECKPOINT(N) to every server and waits: a server writes
its shard (master weights, optimizer state, counters) once it has received all those pushes,
beside the worker's file, which is written after (so a step file found on resume has its
server shards). Worker 0's file holds the model it pulled and the data position every worker
shares. Resume is exact for s = 0: no push of clock N can be applied before worker 0 makes
it. For s > 0 a faster worker's push of clock N may already be in the server's state and is
then applied again after a resume: no applied update is lost.

Faults. Each worker's heartbeat thread tells every server it is alive; a worker silent for
``parallel.worker_timeout_s`` (killed, stopped, its node gone) is dead. By default a server
then ends the job with a line naming it (under a plain ``mpirun`` the launcher has already
done so). With ``parallel.continue_without_dead`` (launched with ``mpirun --enable-recovery``,
so that the launcher lets the others live) the servers go on without it: its clocks no longer
hold anyone back, its data slice is no longer read (under load balancing the live workers
share its samples from the next clock on), and server 0 gathers from the rest. Worker
0 writes the log and the checkpoints, so its death always ends the job. A dead server ends
the job through mpirun or, under ``--enable-recovery``, the workers' stall watchdog.
"""

from __future__ import annotations

import math
import pickle
import time

import torch
from torch import nn

from hvdllm import comm
from hvdllm.errors import UserError
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.grid import rank_coordinates
from hvdllm.parallel.ps_protocol import (CHECKPOINT, DONE, EMPTY, EVALUATE, GATHER, H_APPLIED, H_COUNT, H_DEAD, H_DROPPED,
                                         H_HIST, H_LOSS, H_NONFINITE, H_NORM, H_SPAN_COUNT, H_SPAN_START, H_STOP_AT,
                                         H_UPDATES, H_VERSION, PUSH, S_LOSS, S_NONFINITE, STATS, Heartbeat,
                                         header_size, launcher_keeps_survivors, shard_ranges, tag)


def check_async_layout(cfg, layout) -> None:
    """Refuse, with one line, what the parameter server does not do: before any init."""
    if layout.servers < 1:
        raise UserError("parallel.strategy=async needs parameter servers: set parallel.servers >= 1 "
                        "(launch workers + servers ranks)")
    if layout.pipeline > 1 or len(layout.devices) > 1:
        raise UserError("parallel.strategy=async pushes whole-model gradients: use parallel.pipeline=1 and one device")
    if cfg.train.precision == "fp16":
        raise UserError("parallel.strategy=async with train.precision=fp16 is not supported; use bf16 or fp32")
    if cfg.stages:
        raise UserError("parallel.strategy=async follows one LR schedule on the servers: [[stages]] are not supported")
    if cfg.schedule.plateau:
        raise UserError("parallel.strategy=async: schedule.plateau is not supported (the servers own the lr)")
    if cfg.parallel.load_balance and cfg.parallel.max_staleness > 0:
        raise UserError("parallel.load_balance splits the global batch of a synchronous clock: it needs "
                        "parallel.max_staleness=0")
    if cfg.parallel.op != "average" or cfg.parallel.compression != "none":
        raise UserError("parallel.strategy=async pushes float32 gradients: use parallel.op=average and "
                        "parallel.compression=none")
    if cfg.parallel.continue_without_dead:
        if not launcher_keeps_survivors():
            raise UserError("parallel.continue_without_dead: this mpirun kills every rank when one dies; launch "
                            "with mpirun --enable-recovery (horovodrun: --mpi-args=--enable-recovery)")
        stall = cfg.train.stall_timeout_s
        if stall and cfg.parallel.worker_timeout_s >= stall:
            raise UserError(f"parallel.worker_timeout_s={cfg.parallel.worker_timeout_s:g} must be below "
                            f"train.stall_timeout_s={stall:g}: the workers waiting for a dead one would end "
                            f"the job first")


class ParameterServerWorker(ParallelStrategy):
    """The worker side (the server side is ``hvdllm.parallel.server_loop``)."""

    def setup(self, threads: int) -> None:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:  # the heartbeat thread sends beside the main one
            raise UserError("parallel.strategy=async needs an MPI library with MPI_THREAD_MULTIPLE")
        if world.Get_size() != self.layout.world_size:
            raise UserError("parallel.strategy=async pushes over MPI: launch with mpirun, srun or horovodrun --mpi "
                            "(not --gloo)")
        self.coords = rank_coordinates(self.layout, world.Get_rank())
        is_server = self.coords.role == "server"
        self.dead_workers = 0  # as the servers last said
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        comm.set_threads(threads, ranks_on_node=node.Get_size())
        node.Free()
        self.p2p = world.Dup()  # the protocol's messages, apart from anything else on COMM_WORLD
        # The servers sum their shards' gradient norms on a communicator of their own.
        self.group_comm = world.Split(color=1 if is_server else 0, key=world.Get_rank())
        if is_server:
            return
        self.servers = list(range(self.layout.workers, self.layout.world_size))
        self.clock = 0
        self.gathered = 0  # collectives so far (their order is the same on every worker)
        self.started = time.perf_counter()
        self.metrics: dict = {}
        self.span: tuple[int, int] | None = None  # parallel.load_balance: this clock's samples of the global batch
        self.computed = (0, 0.0)  # the last step's samples and its forward and backward's seconds
        self.heartbeat = Heartbeat(self.p2p, self.servers, self.cfg.worker_timeout_s / 5)

    @property
    def world_size(self) -> int:
        """The ranks that run the training loop (RNG states, MFU, the stall watchdog): workers."""
        return self.layout.workers

    def serve(self) -> int:
        """A server rank's whole job (run.py calls this instead of the Trainer)."""
        from hvdllm.parallel.server_loop import ParameterServer

        server = ParameterServer(self.run_cfg, self.layout, self.coords, self.p2p, self.group_comm)
        status = server.serve()
        self.dead_workers = len(server.dead)
        return status

    @property
    def peers_died(self) -> bool:
        return self.dead_workers > 0

    # --- buffers -------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ranges = shard_ranges([p.numel() for p in self.params], len(self.servers))
        self.shards = [self.params[a:b] for a, b in self.ranges]
        head = header_size(self.cfg.max_staleness)
        numels = [sum(p.numel() for p in shard) for shard in self.shards]
        self.push_buffers = [torch.empty(STATS * 8 + 4 * n, dtype=torch.uint8) for n in numels]
        self.reply_buffers = [torch.empty(head * 8 + 4 * n, dtype=torch.uint8) for n in numels]
        return optimizer  # never stepped here: the servers own the update

    def _push_parts(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = self.push_buffers[k]
        return buffer[:STATS * 8].view(torch.float64), buffer[STATS * 8:].view(torch.float32)

    def _reply_parts(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        head = header_size(self.cfg.max_staleness)
        buffer = self.reply_buffers[k]
        return buffer[:head * 8].view(torch.float64), buffer[head * 8:].view(torch.float32)

    def broadcast_state(self, model: nn.Module, optimizer) -> None:
        """The first pull: the servers' parameters (theirs count, also after a resume)."""
        self._exchange(torch.zeros(STATS, dtype=torch.float64), clock=self.clock, push=False)
        self._load_params()
        self.started = time.perf_counter()  # pushes per second count from the first pull

    # --- one step --------------------------------------------------------------------------
    def train_slice(self, batch_size: int) -> tuple[int, int, int]:
        """With parallel.load_balance every worker reads the whole global batch and computes
        the span server 0 gives it (see forward_backward)."""
        if self.cfg.load_balance:
            return 0, 1, self.layout.data * batch_size
        return super().train_slice(batch_size)

    def forward_backward(self, model: nn.Module, micro_batches, precision) -> tuple[float, bool]:
        if self.span is not None:
            micro_batches = [batch.rows(*self.span) for batch in micro_batches]
        start = time.perf_counter()
        result = super().forward_backward(model, micro_batches, precision)
        self.computed = (sum(len(batch.inputs) for batch in micro_batches), time.perf_counter() - start)
        return result

    @torch.no_grad()
    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        """Push this clock's gradient (clipped per push when s > 0) with the step statistics,
        then wait for the parameters of the next clock. Returns the statistics summed over
        the clock's pushes the server has seen, scaled to ``W`` pushes (all of them for s = 0)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
        samples, seconds = self.computed
        # Under load_balance a span's mean gradient counts by its samples: the servers divide
        # the clock's sum by the summed samples, the mean over every sample computed.
        weight = samples if self.cfg.load_balance else 1.0
        stats = torch.cat([step_stats, torch.tensor([samples, seconds], dtype=torch.float64)])
        stats[S_LOSS] *= weight
        if not math.isfinite(norm):
            stats[S_NONFINITE] = 1.0  # dropped (s > 0) or the clock skipped (s = 0), as a non-finite loss
        clip = self.run_cfg.optim.grad_clip
        scale = min(1.0, clip / (norm + 1e-6)) if clip and self.cfg.max_staleness > 0 and math.isfinite(norm) else 1.0
        scale *= weight
        for k in range(len(self.shards)):
            head, flat = self._push_parts(k)
            head.copy_(stats)
            start, end = self.ranges[k]
            torch.cat([g.flatten() for g in grads[start:end]], out=flat)
            if scale != 1.0:
                flat.mul_(scale)
        self.grad_norm = norm
        header = self._exchange(stats, clock=self.clock, push=True)
        scale_to_all = self.layout.data / max(1.0, header[H_COUNT].item())
        return torch.tensor([header[H_LOSS].item() * scale_to_all, header[H_NONFINITE].item(),
                             1.0 if 0 <= header[H_STOP_AT].item() <= self.clock else 0.0], dtype=torch.float64)

    def _exchange(self, stats: torch.Tensor, clock: int, push: bool) -> torch.Tensor:
        """Send this clock's push (or, at the start, an empty pull) to every server and wait
        for their replies; returns server 0's reply header."""
        from mpi4py import MPI

        start = time.perf_counter()
        requests = []
        for k, server in enumerate(self.servers):
            reply = self.reply_buffers[k]
            requests.append(self.p2p.Irecv([reply.numpy(), MPI.BYTE], source=server, tag=tag(clock + push, PUSH)))
            payload = self.push_buffers[k] if push else self.push_buffers[k][:STATS * 8]
            if not push:
                self._push_parts(k)[0].copy_(stats)
            requests.append(self.p2p.Isend([payload.numpy(), MPI.BYTE], dest=server, tag=tag(clock, PUSH)))
        MPI.Request.Waitall(requests)
        self.clock = clock + push  # the clock the pulled parameters are for
        header = self._reply_parts(0)[0].clone()
        self._record(header, time.perf_counter() - start)
        return header

    def _record(self, header: torch.Tensor, waited_s: float) -> None:
        s = self.cfg.max_staleness
        elapsed = time.perf_counter() - self.started
        self.dead_workers = int(header[H_DEAD].item())
        if self.cfg.load_balance:
            self.span = int(header[H_SPAN_START].item()), int(header[H_SPAN_COUNT].item())
        self.metrics = {"staleness": self.clock - int(header[H_VERSION].item()),
                        "staleness_hist": [int(v) for v in header[H_HIST:H_HIST + s + 1].tolist()],
                        "server_updates": int(header[H_UPDATES].item()),
                        "applied_pushes": int(header[H_APPLIED].item()),
                        "dropped_pushes": int(header[H_DROPPED].item()),
                        "dead_workers": self.dead_workers,
                        "pushes_per_s": self.clock / elapsed if elapsed > 0 else 0.0,
                        "pull_wait_s": waited_s}
        self.server_grad_norm = header[H_NORM].item()

    @torch.no_grad()
    def _load_params(self) -> None:
        for k, shard in enumerate(self.shards):
            flat = self._reply_parts(k)[1]
            for param, value in zip(shard, flat.split([p.numel() for p in shard])):
                param.copy_(value.view_as(param))

    def evaluation(self, step: int, evaluate_here) -> dict:
        """Every worker evaluates the same weights, the servers' at ``step`` (a snapshot each
        server takes when the first worker asks), not the copy it pulled, which for s > 0 may
        miss up to s clocks of the others' pushes; then it takes its own copy back."""
        from mpi4py import MPI

        own = [p.detach().clone() for p in self.params]
        requests = []
        for k, server in enumerate(self.servers):
            requests.append(self.p2p.Irecv([self.reply_buffers[k].numpy(), MPI.BYTE], source=server,
                                           tag=tag(step, EVALUATE)))
            requests.append(self.p2p.Isend([self.push_buffers[k][:0].numpy(), MPI.BYTE], dest=server,
                                           tag=tag(step, EVALUATE)))
        MPI.Request.Waitall(requests)
        self._load_params()
        try:
            return {**evaluate_here(), "val_clock": int(self._reply_parts(0)[0][H_VERSION].item())}
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, own):
                    param.copy_(value)

    def update(self, optimizer, model: nn.Module, precision, max_norm: float, nonfinite: bool) -> tuple[float, bool]:
        """Take the pulled parameters. Returns (norm, skipped): for s = 0 the norm of the
        clock's mean gradient and whether the clock was skipped, else this push's own."""
        self._load_params()
        if self.cfg.max_staleness == 0:
            return self.server_grad_norm, nonfinite or not math.isfinite(self.server_grad_norm)
        return self.grad_norm, not math.isfinite(self.grad_norm) or nonfinite

    def apply_update(self, optimizer, scaler) -> None:
        raise RuntimeError("a parameter-server worker never steps an optimizer: the servers do")

    def close(self) -> None:
        """Tell every server this worker is done (after its last push and heartbeat)."""
        from mpi4py import MPI

        self.heartbeat.stop()
        MPI.Request.Waitall([self.p2p.Isend([EMPTY, MPI.BYTE], dest=server, tag=tag(self.clock, DONE))
                             for server in self.servers])

    def step_metrics(self) -> dict:
        return dict(self.metrics)

    def state_dict(self, model: nn.Module, optimizer) -> dict:
        """Worker 0 (the one that writes): the servers write their shards first, then this."""
        from mpi4py import MPI

        requests = [self.p2p.Irecv([EMPTY, MPI.BYTE], source=server, tag=tag(self.clock, CHECKPOINT))
                    for server in self.servers]
        requests += [self.p2p.Isend([EMPTY, MPI.BYTE], dest=server, tag=tag(self.clock, CHECKPOINT))
                     for server in self.servers]
        MPI.Request.Waitall(requests)
        return {**super().state_dict(model, optimizer), "async": {"servers": len(self.servers), "clock": self.clock}}

    def load_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        saved = state.get("async")
        if saved is None or saved["servers"] != len(self.servers):
            raise UserError(f"checkpoint was not written by parallel.strategy=async with parallel.servers="
                            f"{len(self.servers)}: resume it with its own strategy and servers")
        super().load_state_dict(model, optimizer, state)
        self.clock = int(saved["clock"])  # the servers resume at the same clock

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        parts = self._gather(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return sum(torch.frombuffer(bytearray(part), dtype=tensor.dtype).view_as(tensor) for part in parts)

    def allgather_object(self, obj, name: str) -> list:
        return [pickle.loads(part) for part in self._gather(pickle.dumps(obj))]

    def _gather(self, payload: bytes) -> list[bytes]:
        """The workers' one collective: every live worker's ``payload``, in rank order,
        gathered by server 0 (which leaves out a worker that died)."""
        from mpi4py import MPI

        server, status = self.servers[0], MPI.Status()
        send = self.p2p.Isend([payload, MPI.BYTE], dest=server, tag=tag(self.gathered, GATHER))
        self.p2p.Probe(source=server, tag=tag(self.gathered, GATHER), status=status)
        reply = bytearray(status.Get_count(MPI.BYTE))
        self.p2p.Recv([reply, MPI.BYTE], source=server, tag=tag(self.gathered, GATHER))
        send.Wait()
        self.gathered += 1
        return pickle.loads(reply)
