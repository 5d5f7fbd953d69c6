"""Asynchronous data parallelism: a sharded parameter server with bounded staleness (SSP).

Roles (hvdllm/parallel/layout.py). The first ``W`` ranks are workers, the last
``parallel.servers = S`` ranks are servers. The model's parameters, in ``model.parameters()``
order, form one flat vector cut at parameter boundaries into ``S`` contiguous ranges of
about equal bytes (:func:`shard_ranges`); server ``k`` holds range ``k`` as master weights
with its optimizer state (AdamW, LAMB, Adafactor from ``build_optimizer``, same parameter
groups as a replica would have), so a per-tensor optimizer (LAMB's trust ratio, Adafactor's
factored moments) acts on whole tensors.

Who talks to whom. Servers never enter the Trainer: ``run.py`` sends them into
:func:`hvdllm.parallel.server_loop.serve`. Horovod is started on the workers only
(``hvd.init(comm=<workers' communicator>)``), so the Trainer's own collectives (evaluation,
the checkpoint's RNG gather) run among the workers and never wait for a server. Pushes and
pulls travel over mpi4py on a duplicate of COMM_WORLD as raw bytes of flat contiguous
buffers (numpy views of torch storage, never pickled); the tag is ``clock * 4 + kind``.

One step of worker ``w`` at clock ``c`` (its own step count): forward and backward on its own
data slice; then :meth:`finish_gradients` sends one PUSH per server (``[3 x float64 step
statistics | float32 gradient shard]``, non-blocking sends) and waits for each server's
reply, ``[header | float32 parameter shard]``, the parameters it computes clock ``c + 1`` on;
:meth:`update` copies them into the model. The replies are the pulls: a server answers the
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
  worker to ``optim.grad_clip`` (its own gradient's norm), at ``lr / W`` so that a clock of
  ``W`` pushes moves the weights about as far as one synchronous step, and further divided
  by the push's staleness with ``parallel.staleness_lr`` (Zhang et al. 2016). A push with a
  non-finite loss or gradient is dropped and counted, never applied.
In both, the LR schedule follows the server's count of complete clocks.

Checkpoints. The Trainer checkpoints every worker at the same step N (its RNG gather is a
collective of the workers), so at that moment every worker has pushed exactly N clocks.
Worker 0, asked for its state, sends CHECKPOINT(N) to every server and waits: a server writes
its shard (master weights, optimizer state, counters) once it has received all those pushes,
beside the worker's file, which is written after (so a step file found on resume has its
server shards). Worker 0's file holds the model it pulled and the data position every worker
shares. Resume is exact for s = 0: no push of clock N can be applied before worker 0 makes
it. For s > 0 a faster worker's push of clock N may already be in the server's state and is
then applied again after a resume: no applied update is lost.

Faults. A rank that dies ends the job: Open MPI's default error handler aborts it and mpirun
prints a line naming the rank; a stopped rank is caught by the workers' stall watchdog.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from hvdllm import comm
from hvdllm.errors import UserError
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.layout import rank_coordinates

PUSH, DONE, CHECKPOINT = 0, 1, 2  # message kinds, the low bits of a tag
KINDS = 4
SERVER_SHARD = 1000  # server k's checkpoint file is shard SERVER_SHARD + k (step-N.stage-100k.pt)
STATS = 3  # loss sum, non-finite flag, stop flag (float64, at the front of a push)
# The reply header (float64): complete clocks when sent, updates, applied and dropped pushes,
# clock at which every worker stops (-1: none), the clock's summed statistics and push count,
# the global gradient norm of the update (s = 0), then the staleness histogram (s + 1 bins).
(H_VERSION, H_UPDATES, H_APPLIED, H_DROPPED, H_STOP_AT, H_LOSS, H_NONFINITE, H_STOP, H_COUNT, H_NORM,
 H_HIST) = range(11)


def header_size(max_staleness: int) -> int:
    return H_HIST + max_staleness + 1


def tag(clock: int, kind: int) -> int:
    return clock * KINDS + kind


def shard_ranges(numels: list[int], servers: int) -> list[tuple[int, int]]:
    """Parameter index ranges ``[start, end)``, one per server, contiguous, non-empty and of
    about equal size: cut ``k`` goes where the running total first reaches ``k / servers`` of
    all elements, but leaves at least one tensor to each range. Raises UserError when there
    are more servers than tensors (workers and servers raise it alike, before any message)."""
    if servers > len(numels):
        raise UserError(f"parallel.servers={servers} is more than the model's {len(numels)} parameter tensors: "
                        f"use fewer servers")
    total, bounds = sum(numels), [0]
    running = [sum(numels[:i + 1]) for i in range(len(numels))]
    for k in range(1, servers):
        cut = next((i + 1 for i, value in enumerate(running) if value >= total * k / servers), len(numels))
        bounds.append(min(max(cut, bounds[-1] + 1), len(numels) - (servers - k)))
    bounds.append(len(numels))
    return list(zip(bounds[:-1], bounds[1:]))


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
    if cfg.parallel.op != "average" or cfg.parallel.compression != "none":
        raise UserError("parallel.strategy=async pushes float32 gradients: use parallel.op=average and "
                        "parallel.compression=none")


class ParameterServerWorker(ParallelStrategy):
    """The worker side (the server side is ``hvdllm.parallel.server_loop``)."""

    def setup(self, threads: int) -> None:
        from mpi4py import MPI  # before Horovod, so that MPI runs with THREAD_MULTIPLE

        world = MPI.COMM_WORLD
        if world.Get_size() != self.layout.world_size:
            raise UserError("parallel.strategy=async pushes over MPI: launch with mpirun, srun or horovodrun --mpi "
                            "(not --gloo)")
        self.coords = rank_coordinates(self.layout, world.Get_rank())
        is_server = self.coords.role == "server"
        self.p2p = world.Dup()  # pushes and pulls never match Horovod's messages
        # Workers and servers each get a communicator of their own: Horovod runs on the
        # workers' (their evaluation and checkpoint collectives), the servers sum norms on theirs.
        self.group_comm = world.Split(color=1 if is_server else 0, key=world.Get_rank())
        if is_server:
            comm.set_threads(threads, ranks_on_node=self.layout.world_size)
            return
        from hvdllm.parallel.sync import apply_horovod_environment

        apply_horovod_environment(self.run_cfg)
        comm.init(comm=self.group_comm, threads=threads)
        self.hvd = comm.horovod()
        self.servers = list(range(self.layout.workers, self.layout.world_size))
        self.clock = 0
        self.started = time.perf_counter()
        self.metrics: dict = {}

    @property
    def world_size(self) -> int:
        """The ranks that run the training loop (RNG states, MFU, the stall watchdog): workers."""
        return self.layout.workers

    def serve(self) -> int:
        """A server rank's whole job (run.py calls this instead of the Trainer)."""
        from hvdllm.parallel.server_loop import ParameterServer

        return ParameterServer(self.run_cfg, self.layout, self.coords, self.p2p, self.group_comm).serve()

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
    @torch.no_grad()
    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        """Push this clock's gradient (clipped per push when s > 0) with the step statistics,
        then wait for the parameters of the next clock. Returns the statistics summed over
        the clock's pushes the server has seen, scaled to ``W`` pushes (all of them for s = 0)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
        stats = step_stats.clone()
        if not math.isfinite(norm):
            stats[1] = 1.0  # dropped (s > 0) or the clock skipped (s = 0), as a non-finite loss
        clip = self.run_cfg.optim.grad_clip
        scale = min(1.0, clip / (norm + 1e-6)) if clip and self.cfg.max_staleness > 0 and math.isfinite(norm) else 1.0
        for k in range(len(self.shards)):
            head, flat = self._push_parts(k)
            head.copy_(stats)
            start, end = self.ranges[k]
            torch.cat([g.flatten() for g in grads[start:end]], out=flat)
            if scale < 1.0:
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
        self.metrics = {"staleness": self.clock - int(header[H_VERSION].item()),
                        "staleness_hist": [int(v) for v in header[H_HIST:H_HIST + s + 1].tolist()],
                        "server_updates": int(header[H_UPDATES].item()),
                        "applied_pushes": int(header[H_APPLIED].item()),
                        "dropped_pushes": int(header[H_DROPPED].item()),
                        "pushes_per_s": self.clock / elapsed if elapsed > 0 else 0.0,
                        "pull_wait_s": waited_s}
        self.server_grad_norm = header[H_NORM].item()

    @torch.no_grad()
    def _load_params(self) -> None:
        for k, shard in enumerate(self.shards):
            flat = self._reply_parts(k)[1]
            for param, value in zip(shard, flat.split([p.numel() for p in shard])):
                param.copy_(value.view_as(param))

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
        """Tell every server this worker is done (after its last push)."""
        from mpi4py import MPI

        empty = torch.empty(0, dtype=torch.uint8)
        MPI.Request.Waitall([self.p2p.Isend([empty.numpy(), MPI.BYTE], dest=server, tag=tag(self.clock, DONE))
                             for server in self.servers])

    def step_metrics(self) -> dict:
        return dict(self.metrics)

    def state_dict(self, model: nn.Module, optimizer) -> dict:
        """Worker 0 (the one that writes): the servers write their shards first, then this."""
        from mpi4py import MPI

        empty = torch.empty(0, dtype=torch.uint8).numpy()
        requests = [self.p2p.Irecv([empty, MPI.BYTE], source=server, tag=tag(self.clock, CHECKPOINT))
                    for server in self.servers]
        requests += [self.p2p.Isend([empty, MPI.BYTE], dest=server, tag=tag(self.clock, CHECKPOINT))
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
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def allgather_object(self, obj, name: str) -> list:
        return self.hvd.allgather_object(obj, name=name)
