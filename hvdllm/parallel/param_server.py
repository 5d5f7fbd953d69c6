"""Asynchronous data parallelism: a sharded parameter server with bounded staleness (SSP).
The worker side, a ParallelStrategy; the servers are server_loop.py (their MPI pump) around
ps_state.py (their state machine). The first ``parallel.data`` ranks are workers, the last
``parallel.servers`` ranks servers; what travels, when a server answers and what an update
is are in docs/design/parameter-server.md.
"""

from __future__ import annotations

import math
import pickle
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from hvdllm import comm
from hvdllm.errors import UserError
from hvdllm.parallel.base import ParallelStrategy
from hvdllm.parallel.grid import SERVER, Grid, rank_coordinates
from hvdllm.parallel.ps_protocol import (PUSH_HEADER, STEP_HEADER, Kind, body_view, encode, header_view,
                                         launcher_keeps_survivors, reply_header, shard_ranges)
from hvdllm.parallel.ps_shard import ServerSetupFactory


def check_async_layout(cfg, layout) -> None:
    """Refuse, with one line, what the parameter server does not do: before any init."""
    if layout.servers < 1:
        raise UserError("parallel.strategy=async needs parameter servers: set parallel.servers >= 1 "
                        "(launch workers + servers ranks)")
    if layout.pipeline > 1 or layout.tensor > 1 or len(layout.devices) > 1:
        raise UserError("parallel.strategy=async pushes whole-model gradients: use parallel.pipeline=1, "
                        "parallel.tensor=1 and one device")
    if cfg.train.precision == "fp16":
        raise UserError("parallel.strategy=async with train.precision=fp16 is not supported; use bf16 or fp32")
    if cfg.phases:
        raise UserError("parallel.strategy=async follows one LR schedule on the servers: [[phases]] are not supported")
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
    """The worker side. ``server_setup(cfg, layout, index)`` builds what server ``index``
    needs from the layers above this one (hvdllm.train.server_setup)."""

    def __init__(self, cfg, layout: Grid, server_setup: ServerSetupFactory | None = None) -> None:
        super().__init__(cfg, layout)
        self.server_setup = server_setup

    def setup(self, threads: int) -> None:
        from hvdllm.parallel.ps_link import Heartbeat, WorkerLink, open_comms

        self.comms = open_comms(self.layout.world_size, self.layout.workers)
        self.coords = rank_coordinates(self.layout, self.comms.rank)
        self.local_rank = self.comms.local_rank
        comm.set_threads(threads, ranks_on_node=self.comms.ranks_on_node)
        self.dead_workers = 0  # as the servers last said
        if self.coords.role == SERVER:
            return
        self.link = WorkerLink(self.comms.p2p, list(range(self.layout.workers, self.layout.world_size)))
        self.clock = 0
        self.gathered = 0  # collectives so far (their order is the same on every worker)
        self.started = time.perf_counter()
        self.metrics: dict = {}
        self.span: tuple[int, int] | None = None  # parallel.load_balance: this clock's samples of the global batch
        self.computed = (0, 0.0)  # the last step's samples and its forward and backward's seconds
        self.heartbeat = Heartbeat(self.link, self.cfg.worker_timeout_s / 5)

    def run(self, train: Callable[[], int]) -> int:
        """A worker trains; a server serves until every worker is done."""
        if self.coords.role != SERVER:
            return train()
        from hvdllm.parallel.server_loop import ParameterServer

        if self.server_setup is None:
            raise RuntimeError("a parameter server needs build_strategy(..., server_setup=...)")
        index, workers = self.coords.rank - self.layout.workers, self.layout.workers
        server = ParameterServer(self.run_cfg, self.server_setup(self.run_cfg, self.layout, index), index, workers,
                                 self.layout.servers, self.comms.p2p, self.comms.servers_comm)
        status = server.serve()
        self.dead_workers = len(server.state.dead)
        return status

    @property
    def world_size(self) -> int:
        """The ranks that run the training loop (RNG states, MFU): workers."""
        return self.layout.workers

    @property
    def peers_died(self) -> bool:
        return self.dead_workers > 0

    def awaited_peers(self) -> str:
        """A worker waits for the servers alone: they, not its peers, notice a silent worker."""
        servers = self.link.servers
        if len(servers) == 1:
            return f"parameter server rank {servers[0]}"
        return f"the parameter servers (ranks {', '.join(map(str, servers))})"

    # --- buffers -------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ranges = shard_ranges([p.numel() for p in self.params], len(self.link.servers))
        self.shards = [self.params[a:b] for a, b in self.ranges]
        self.reply_dtype = reply_header(self.cfg.max_staleness)
        numels = [sum(p.numel() for p in shard) for shard in self.shards]
        # One message buffer per server each way: [PUSH_HEADER | gradient], [reply header | parameters].
        self.pushes = [torch.empty(PUSH_HEADER.itemsize + 4 * n, dtype=torch.uint8) for n in numels]
        self.replies = [torch.empty(self.reply_dtype.itemsize + 4 * n, dtype=torch.uint8) for n in numels]
        return optimizer  # never stepped here: the servers own the update

    def broadcast_state(self, model: nn.Module, optimizer) -> None:
        """The first pull: the servers' parameters (theirs count, also after a resume)."""
        self._exchange(Kind.PULL)
        self._load_params()
        self.started = time.perf_counter()  # pushes per second count from the first pull

    # --- one step --------------------------------------------------------------------------
    def train_slice(self, batch_size: int) -> tuple[int, int, int]:
        """With parallel.load_balance every worker reads the whole global batch and computes
        the span server 0 gives it (see forward_backward)."""
        if self.cfg.load_balance:
            return 0, 1, self.layout.data * batch_size
        return super().train_slice(batch_size)

    def forward_backward(self, model: nn.Module, accum_batches, precision) -> tuple[float, bool]:
        if self.span is not None:
            accum_batches = [batch.rows(*self.span) for batch in accum_batches]
        start = time.perf_counter()
        result = super().forward_backward(model, accum_batches, precision)
        self.computed = (sum(len(batch.inputs) for batch in accum_batches), time.perf_counter() - start)
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
        loss, nonfinite, stop = step_stats.tolist()
        if not math.isfinite(norm):
            nonfinite = 1.0  # dropped (s > 0) or the clock skipped (s = 0), as a non-finite loss
        clip = self.run_cfg.optim.grad_clip
        scale = min(1.0, clip / (norm + 1e-6)) if clip and self.cfg.max_staleness > 0 and math.isfinite(norm) else 1.0
        scale *= weight
        for k, (start, end) in enumerate(self.ranges):
            flat = body_view(self.pushes[k], PUSH_HEADER)
            torch.cat([g.flatten() for g in grads[start:end]], out=flat)
            if scale != 1.0:
                flat.mul_(scale)
        self.grad_norm = norm
        header = self._exchange(Kind.PUSH, loss=loss * weight, nonfinite=nonfinite, stop=stop, samples=samples,
                                seconds=seconds)
        scale_to_all = self.layout.data / max(1.0, float(header["weight"]))
        return torch.tensor([float(header["loss"]) * scale_to_all, float(header["nonfinite"]),
                             1.0 if 0 <= header["stop_at"] <= self.clock else 0.0], dtype=torch.float64)

    def _exchange(self, kind: Kind, **stats: float) -> np.void:
        """A PULL (header only) or PUSH (header and the gradients already in place) of this
        clock to every server; waits for their replies, and returns server 0's header.
        ``stats``: the PUSH_HEADER's statistics (a PULL has none: zeros)."""
        start = time.perf_counter()
        for buffer in self.pushes:
            header = header_view(buffer, PUSH_HEADER)
            header["clock"] = self.clock
            for name in PUSH_HEADER.names[1:]:
                header[name] = stats.get(name, 0.0)
        size = None if kind == Kind.PUSH else PUSH_HEADER.itemsize
        self.link.exchange(kind, [b[:size].numpy() for b in self.pushes], [b.numpy() for b in self.replies])
        if kind == Kind.PUSH:
            self.clock += 1  # the clock the pulled parameters are for
        header = header_view(self.replies[0][:self.reply_dtype.itemsize].clone(), self.reply_dtype)
        self._record(header, time.perf_counter() - start)
        return header

    def _record(self, header: np.void, waited_s: float) -> None:
        elapsed = time.perf_counter() - self.started
        self.dead_workers = int(header["dead"])
        if self.cfg.load_balance:
            self.span = int(header["span_start"]), int(header["span_count"])
        self.metrics = {"staleness": self.clock - int(header["version"]),
                        "staleness_hist": [int(v) for v in header["hist"]],
                        "server_updates": int(header["updates"]),
                        "applied_pushes": int(header["applied"]),
                        "dropped_pushes": int(header["dropped"]),
                        "dead_workers": self.dead_workers,
                        "pushes_per_s": self.clock / elapsed if elapsed > 0 else 0.0,
                        "pull_wait_s": waited_s}
        self.server_grad_norm = float(header["norm"])

    @torch.no_grad()
    def _load_params(self) -> None:
        for buffer, shard in zip(self.replies, self.shards):
            flat = body_view(buffer, self.reply_dtype)
            for param, value in zip(shard, flat.split([p.numel() for p in shard])):
                param.copy_(value.view_as(param))

    def evaluation(self, step: int, evaluate_here) -> dict:
        """Every worker evaluates the same weights, the servers' at ``step`` (a snapshot each
        server takes when the first worker asks), not the copy it pulled, which for s > 0 may
        miss up to s clocks of the others' pushes; then it takes its own copy back."""
        own = [p.detach().clone() for p in self.params]
        request = step_message(step)
        self.link.exchange(Kind.EVALUATE, [request] * len(self.replies), [b.numpy() for b in self.replies])
        self._load_params()
        try:
            return {**evaluate_here(), "val_clock": int(header_view(self.replies[0], self.reply_dtype)["version"])}
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

    def close(self) -> None:
        """Tell every server this worker is done (after its last push and heartbeat)."""
        self.heartbeat.stop()
        self.link.tell(Kind.DONE, step_message(self.clock))

    def step_metrics(self) -> dict:
        return dict(self.metrics)

    def state_dict(self, model: nn.Module, optimizer) -> dict:
        """Worker 0 (the one that writes): the servers write their shards first, then this."""
        servers = len(self.link.servers)
        self.link.exchange(Kind.CHECKPOINT, [step_message(self.clock)] * servers,
                           [np.empty(0, dtype=np.uint8)] * servers)
        return {**super().state_dict(model, optimizer), "async": {"servers": servers, "clock": self.clock}}

    def checkpoint_layout_problem(self, saved: dict) -> str:
        return super().checkpoint_layout_problem(saved) or servers_problem(saved, self.layout.servers)

    def load_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        saved = state.get("async")
        if saved is None or saved["servers"] != len(self.link.servers):
            raise UserError(f"checkpoint was not written by parallel.strategy=async with parallel.servers="
                            f"{len(self.link.servers)}: resume it with its own strategy and servers")
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
        reply = self.link.gather(encode(step_header(self.gathered), payload))
        self.gathered += 1
        return pickle.loads(reply)


def step_header(step: int) -> np.void:
    header = np.zeros(1, dtype=STEP_HEADER)[0]
    header["step"] = step
    return header


def step_message(step: int) -> np.ndarray:
    """A DONE, CHECKPOINT or EVALUATE message: its header alone."""
    return encode(step_header(step))


def servers_problem(saved: dict, servers: int) -> str:
    """Why a run with ``servers`` parameter servers cannot take a checkpoint of layout ``saved``
    (each server resumes from its own file), "" if it can; the same check on workers and servers."""
    theirs = int(saved.get("servers", 0))
    if theirs == servers:
        return ""
    return (f"the checkpoint was written by {theirs} parameter server(s), this run has {servers}: resume it "
            f"with parallel.servers={theirs}")
