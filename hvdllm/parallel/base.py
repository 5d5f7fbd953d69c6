"""The seam between the training loop and how work and updates travel between ranks.

A strategy owns everything parallel about a run: starting the communication runtime with
the process sets its layout needs (:meth:`setup`), cutting and placing the model
(:meth:`parallelize`), wrapping the optimizer, running forward and backward over the
micro-batches of a step (:meth:`forward_backward`), exchanging gradients together with the
step statistics (:meth:`finish_gradients`), clipping by the global norm over every rank that
holds parameters (:meth:`clip_grad_norm_`), the skip/step decision (:meth:`update`), and
what each rank contributes to a checkpoint (:meth:`state_dict`). The Trainer calls only
this interface and never imports Horovod or mpi4py, so a ring allreduce, a pipeline stage
or a parameter server can stand behind it.

Every rank must issue the same collectives in the same order: each method that
communicates says so, and the Trainer calls them identically on every rank.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Callable, Sequence

import torch
from torch import nn

from hvdllm.parallel.grid import Grid, RankCoords, build_grid, rank_coordinates
from hvdllm.parallel.precision import Precision
from hvdllm.parallel.reshard import model_slice, optimizer_parameter_names, optimizer_slice
from hvdllm.parallel.update import step_optimizer


class ParallelStrategy(ABC):
    def __init__(self, cfg, layout: Grid) -> None:
        self.run_cfg = cfg  # the whole Config: a cut is balanced for the run's batch and optimizer
        self.cfg = cfg.parallel
        self.layout = layout
        self.coords: RankCoords | None = None  # known once setup() has started the runtime
        self.local_rank: int | None = None  # this rank on its node, where Horovod does not say
        self.device = torch.device("cpu")

    # --- set-up -----------------------------------------------------------------------------
    @abstractmethod
    def setup(self, threads: int) -> None:
        """Start the communication runtime this layout needs, learn this rank's coordinates,
        and give torch ``threads`` threads (0 = the node's cores over its ranks)."""

    def adopt_world(self, rank: int, size: int) -> None:
        """After the runtime re-formed with another world (Horovod elastic): the grid of the
        ``size`` ranks there are now (``parallel.data = 0``: all of them) and this rank's place."""
        self.layout = build_grid(self.cfg, size)
        self.coords = rank_coordinates(self.layout, rank)

    def run(self, train: Callable[[], int]) -> int:
        """Run this rank's part of the job: ``train()`` on a worker; a parameter-server
        strategy's server ranks serve instead. Returns the exit status."""
        return train()

    @property
    def data_rank(self) -> tuple[int, int]:
        """(rank, size) of this process in its data-parallel group: the loader's slice."""
        return self.coords.data_rank, self.layout.data

    def train_slice(self, batch_size: int) -> tuple[int, int, int]:
        """(rank, ranks, samples per batch) of the training loader of this rank: by default
        its own slice of each global batch, as the data-parallel group divides it."""
        return (*self.data_rank, batch_size)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that prints, logs metrics and writes the run's files."""
        return self.coords.is_logging_rank

    @property
    def reports_loss(self) -> bool:
        """Whether this rank's losses count in the sums over ranks: the one rank of each
        replica that holds the whole loss (a pipeline's last stage, a tensor group's first)."""
        return True

    @property
    def writes_checkpoint(self) -> bool:
        """Whether this rank holds state no other rank writes (data rank 0 of each stage)."""
        return self.coords.data_rank == 0

    @property
    def checkpoint_shard(self) -> int:
        """Which shard of a checkpoint this rank's state is: its model part, stage-major with the
        tensor rank within (stage s of a run without tensor parallelism is shard s)."""
        return self.coords.stage * self.layout.tensor + self.coords.tensor_rank

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Cut, place and wrap the model; returns the part this rank trains. With several
        ``parallel.devices`` the blocks are placed across them (``device`` is the first)."""
        self.device = device
        devices = self.layout.devices
        if len(devices) <= 1:
            return model.to(device)
        from hvdllm.comm import choose_device
        from hvdllm.parallel.stage_model import PlacedGPT, plan_cut

        data = self.run_cfg.data
        micro_batch = max(1, data.batch_size // self.cfg.micro_batches)
        cut, _ = plan_cut(model.cfg, self.cfg, len(devices), data.seq_len or model.cfg.block_size, micro_batch,
                          self.run_cfg.optim.name)
        return PlacedGPT(model, cut, [choose_device(name) for name in devices], self.cfg.micro_batches)

    @abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer the loop steps (e.g. a Horovod DistributedOptimizer around it)."""

    @abstractmethod
    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective: make the replicas' parameters and optimizer state equal."""

    # --- one optimizer step -------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, accum_batches: Sequence, precision: Precision) -> tuple[float, bool]:
        """Forward and backward of every micro-batch of one step, gradients accumulating.

        Returns the sum of the micro-batches' finite losses and whether all were finite.
        Each loss is divided by the number of micro-batches before backward, so the
        accumulated gradient is that of the mean over all their samples.
        """
        loss_sum, finite = 0.0, True
        start = time.perf_counter()
        for batch in accum_batches:
            inputs = batch.inputs.to(self.device, non_blocking=True)
            targets = batch.targets.to(self.device, non_blocking=True)
            mask = batch.loss_mask.to(self.device, non_blocking=True) if batch.loss_mask is not None else None
            with precision.autocast():
                _, loss = model(inputs, targets, mask)
            precision.backward(loss / len(accum_batches))
            value = loss.item()
            finite = finite and math.isfinite(value)
            loss_sum += value if math.isfinite(value) else 0.0
        self.inject_slowdown(time.perf_counter() - start)
        return loss_sum, finite

    def inject_slowdown(self, compute_s: float) -> None:
        """Fault injection (``train.slowdown_rank``): that rank sleeps ``(factor - 1)`` times its
        own compute time, a straggler whose slowness scales with the model, for benchmarks."""
        train = self.run_cfg.train
        if self.coords is not None and self.coords.rank == train.slowdown_rank:
            time.sleep((train.slowdown_factor - 1.0) * compute_s)

    def close(self) -> None:
        """After the training loop ends normally: tell peers this rank is done."""

    @property
    def peers_died(self) -> bool:
        """Whether the job went on without ranks that died (parallel.continue_without_dead)."""
        return False

    def awaited_peers(self) -> str:
        """Whom this rank waits for inside a step, as the stall watchdog names them."""
        return "the other ranks"

    def step_metrics(self) -> dict:
        """Extra fields for this step's metrics record (e.g. bytes communicated, staleness)."""
        return {}

    def evaluation(self, step: int, evaluate_here: Callable[[], dict]) -> dict:
        """Collective: the validation metrics at ``step``. ``evaluate_here`` evaluates this
        rank's model on its val slice (itself a collective); a strategy whose weights live
        elsewhere first puts them in the model."""
        return evaluate_here()

    def forward_only(self, model: nn.Module, inputs: torch.Tensor, precision: Precision) -> torch.Tensor | None:
        """Collective under a pipeline: the logits of ``inputs`` for evaluation, on the ranks
        that produce them (None on the others)."""
        with precision.autocast():
            return model(inputs.to(self.device))[0]

    @abstractmethod
    def finish_gradients(self, optimizer: torch.optim.Optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        """Collective: complete the gradient exchange of this step (after the last backward)
        and return ``step_stats`` (loss, flags) summed over all ranks. The two travel in the
        same round, so a step waits for the network once, not twice."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Clip this rank's gradients to the global norm ``max_norm``; returns the norm before.
        The exchanged gradients are the global ones, so the local norm is the global one."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    def apply_update(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        """Step the optimizer on the finished (unscaled, clipped) gradients."""
        step_optimizer(optimizer, scaler)

    def update(self, optimizer: torch.optim.Optimizer, model: nn.Module, precision: Precision,
               max_norm: float, nonfinite: bool) -> tuple[float, bool]:
        """The skip/step decision once gradients are exchanged: skip when any rank saw a
        non-finite loss (``nonfinite``, agreed through the step statistics) or the global
        gradient norm is not finite; else unscale, clip and step. The fp16 loss scaler skips
        (and lowers its scale) by itself. Returns (gradient norm before clipping, skipped)."""
        if nonfinite:
            return math.nan, True
        scaler = precision.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)  # after the exchange: every rank unscales the same sums
        grad_norm = self.clip_grad_norm_(model, max_norm or math.inf)
        if scaler is not None:
            self.apply_update(optimizer, scaler)
            scaler.update()
            return grad_norm, False
        if not math.isfinite(grad_norm):
            return grad_norm, True
        self.apply_update(optimizer, None)
        return grad_norm, False

    def scaled_update_on_the_global_norm(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                                         scaler: torch.amp.GradScaler, max_norm: float) -> tuple[float, bool]:
        """fp16 where ranks hold different gradients (pipeline stages, tensor slices, ZeRO-2's
        shares): each unscales its own, and whether to step and how the scale moves follow the
        global norm, which every rank sees alike, not each rank's own inf check (a rank with
        finite gradients must skip and back off with the one that overflowed)."""
        scaler.scale(torch.zeros((), device=self.device))  # a rank without the loss still needs its scale set
        scaler.unscale_(optimizer)
        grad_norm = self.clip_grad_norm_(model, max_norm or math.inf)
        if math.isfinite(grad_norm):
            self.apply_update(optimizer, None)
            scaler.update()  # no rank found an inf: the same growth everywhere
        else:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # skipped, backed off on every rank
        return grad_norm, False  # as with one model: an overflow is the scaler's to handle, not a bad step

    # --- metrics and checkpoints -----------------------------------------------------------------
    @abstractmethod
    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Collective: sum a small tensor of metrics over all ranks."""

    @abstractmethod
    def allgather_object(self, obj, name: str) -> list:
        """Collective: one Python object from every rank, in rank order."""

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's shard of the training state: its part of the model, its optimizer
        state, and the layout it was cut for."""
        return {"model": model.state_dict(), "optimizer": self.optimizer_state(optimizer),
                "layout": self.checkpoint_layout(), "optimizer_names": optimizer_parameter_names(model, optimizer)}

    def checkpoint_layout(self) -> dict:
        """The layout a checkpoint records; "named_optimizer": its shards name their optimizer's
        parameters ("optimizer_names"), so that another cut can take them."""
        return {**asdict(self.layout), "cut": self.pipeline_cut(), "zero": self.cfg.zero, "named_optimizer": True}

    @property
    def gathers_checkpoint_state(self) -> bool:
        """Whether :meth:`state_dict` is a collective, to be called on every rank (ZeRO)."""
        return False

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state this rank's checkpoint shard holds."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def banner_notes(self) -> list[str]:
        """Lines for the run's banner about how this strategy spreads the state."""
        return []

    def checkpoint_layout_problem(self, saved: dict) -> str:
        """Why this run cannot take a checkpoint of layout ``saved`` (its stage 0 file's
        "layout"), and what can; "" if it can. A pure check, so every rank makes it before any
        rank reads a file. A model cut into other pieces is re-sliced (parallel/reshard.py),
        unless the checkpoint predates named optimizer parameters or holds replicas that differ
        (local SGD's: no one whole model to re-slice); those need the layout they were cut for."""
        same_pieces = (saved.get("pipeline", 1), saved.get("tensor", 1)) == (self.layout.pipeline, self.layout.tensor)
        return "" if same_pieces or _recuttable(saved) else self._other_cut(saved, None)

    def cuts_like(self, saved: dict) -> bool:
        """Whether this run's model is cut as the checkpoint of layout ``saved`` was (known
        once the model is): if so each rank takes its own shard's file, else the whole state
        re-sliced."""
        return (saved.get("pipeline", 1), saved.get("tensor", 1), saved.get("cut")) == (
            self.layout.pipeline, self.layout.tensor, self.pipeline_cut())

    def recut_problem(self, saved: dict) -> str:
        """Once the model is cut: why this run cannot take the checkpoint of layout ``saved``
        (the same pieces cut at other blocks, where it cannot be re-sliced), "" if it can."""
        if self.cuts_like(saved) or _recuttable(saved):
            return ""
        return self._other_cut(saved, self.pipeline_cut())

    def _other_cut(self, saved: dict, my_cut: list[int] | None) -> str:
        stages, cut, tensor = saved.get("pipeline", 1), saved.get("cut"), saved.get("tensor", 1)
        settings = f"parallel.pipeline={stages}" + (f", parallel.stage_layers={cut}" if cut else "")
        why = "its local-SGD replicas differ, one file per rank" if saved.get("replicas_differ") else (
            "it predates re-slicing")
        return (f"checkpoint was cut into {_cut_phrase(stages, cut, tensor)}, this run into "
                f"{_cut_phrase(self.layout.pipeline, my_cut, self.layout.tensor)}, and {why}: resume it with "
                f"{settings}, parallel.tensor={tensor} (on a multiple of {stages * tensor} ranks)")

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load this rank's shard of a checkpoint cut as this run's model is (checked by
        :meth:`recut_problem`), or cut this rank's part out of a whole one (checkpoint.whole_state:
        another cut)."""
        if state.get("whole"):
            rank, ranks = self.coords.tensor_rank, self.layout.tensor
            model.load_state_dict(model_slice(model, state["model"], rank, ranks))
            names = optimizer_parameter_names(model, optimizer)
            self.load_optimizer_state(optimizer, optimizer_slice(optimizer, names, state["optimizer"], state["model"],
                                                                 rank, ranks))
            return
        model.load_state_dict(state["model"])
        self.load_optimizer_state(optimizer, state["optimizer"])

    def pipeline_cut(self) -> list[int] | None:
        """Blocks per pipeline stage, as recorded in checkpoints (None without a pipeline)."""
        return None


def _recuttable(saved: dict) -> bool:
    """Whether a checkpoint of layout ``saved`` can be re-sliced for another cut."""
    return bool(saved.get("named_optimizer")) and not saved.get("replicas_differ")


def layout_phrase(layout: dict) -> str:
    """A run's layout as a checkpoint records it, in words: "data 2 x zero 1, one piece"."""
    data = f"data {layout.get('data', 1)}" + (f" x zero {layout['zero']}" if layout.get("zero") else "")
    return f"{data}, {_cut_phrase(layout.get('pipeline', 1), layout.get('cut'), layout.get('tensor', 1))}"


def _cut_phrase(stages: int, cut: list[int] | None, tensor: int) -> str:
    """How a model is cut, in words: "2 pipeline stages of [1, 1] blocks x 2 tensor ranks",
    "one piece" (no pipeline, no tensor parallelism)."""
    if stages == 1 and tensor == 1:
        return "one piece"
    phrase = f"{stages} pipeline stage{'s' if stages > 1 else ''}" + (f" of {cut} blocks" if cut else "")
    return phrase + (f" x {tensor} tensor ranks" if tensor > 1 else "")
