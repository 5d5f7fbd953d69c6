"""Pipeline parallelism across ranks, with Horovod data parallelism inside each stage.

Each rank of a pipeline holds one stage of the model (:mod:`hvdllm.parallel.stage_model`),
cut by ``parallel.stage_layers`` or balanced by ``parallel.balance``. Each loader batch is
split into ``parallel.micro_batches`` micro-batches, run through the stages in the order of
``parallel.schedule`` (GPipe or 1F1B, :mod:`hvdllm.parallel.schedules`), activations and
their gradients travelling point to point (:mod:`hvdllm.parallel.transport`).

With ``parallel.data = d`` pipelines, each stage's gradients are averaged by Horovod in that
stage's process set. Every rank of a pipeline reads the same data slice (the loader is sliced
by data rank only): the first stage uses the tokens, the last the targets. The loss exists on
the last stage only and reaches the logging rank through the step statistics, which every
rank reduces globally. The global gradient norm sums each stage's squared norm over all
ranks. A tied embedding lives on the first stage and, as a copy, on the last: their gradients
are summed after backward, so the two copies take the same updates and stay equal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hvdllm.errors import UserError
from hvdllm.model.gpt import language_model_loss
from hvdllm.parallel.precision import Precision
from hvdllm.parallel.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD,
                                       build_schedule)
from hvdllm.parallel.stage_model import GPTStage, cut_model, plan_cut
from hvdllm.parallel.sync import HorovodSync
from hvdllm.parallel.transport import MpiTransport


# MPI guarantees tags up to 32767; micro-batch i uses 2i and 2i + 1, below it (config checks).
TIED_GRADIENT_TAG = 32767


def split_into_micro_batches(batch, parts: int) -> list:
    """A loader batch as ``parts`` micro-batches of equal size (same fields, rows split)."""
    fields = {name: getattr(batch, name) for name in ("inputs", "targets", "loss_mask")}
    chunks = {name: value.chunk(parts) if value is not None else [None] * parts for name, value in fields.items()}
    return [type(batch)(**{name: chunks[name][i] for name in fields}) for i in range(parts)]


class PipelineParallel(HorovodSync):
    def __init__(self, cfg, layout) -> None:
        super().__init__(cfg, layout)
        self.stage: GPTStage | None = None

    def setup(self, threads: int) -> None:
        from mpi4py import MPI  # before hvd.init, so that MPI runs with THREAD_MULTIPLE

        if MPI.COMM_WORLD.Get_size() != self.layout.world_size:
            raise UserError("parallel.pipeline > 1 sends activations over MPI: launch with mpirun, srun or "
                            "horovodrun --mpi (not --gloo)")
        super().setup(threads)
        self.transport = MpiTransport(MPI.COMM_WORLD)
        group, stage = self.coords.pipeline_group, self.coords.stage
        self.previous = group[stage - 1] if stage > 0 else None
        self.next = group[stage + 1] if stage < len(group) - 1 else None
        self.actions = build_schedule(self.cfg.schedule, stage, len(group), self.cfg.micro_batches)

    @property
    def backward_passes_per_step(self) -> int:
        return self.cfg.accum_steps * self.cfg.micro_batches

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        cfg = self.run_cfg
        micro_batch = max(1, cfg.data.batch_size // self.cfg.micro_batches)
        self.cut, _ = plan_cut(model.cfg, self.cfg, self.layout.pipeline, cfg.data.seq_len or model.cfg.block_size,
                               micro_batch, cfg.optim.name)
        self.device = device
        self.stage = cut_model(model, self.cut, self.coords.stage).to(device)
        return self.stage

    def pipeline_cut(self) -> list[int]:
        return list(self.cut)

    def wrap_optimizer(self, optimizer, model: nn.Module):
        if self.layout.data == 1:
            return optimizer  # one replica per stage: nothing to average
        return super().wrap_optimizer(optimizer, model)

    def broadcast_state(self, model: nn.Module, optimizer) -> None:
        # Every replica is built from the same seed, or loads the same shard on resume; the
        # broadcast inside the stage's process set is a guarantee, not a necessity.
        if self.layout.data > 1:
            root = self.coords.data_group[0]  # a global rank, a member of the process set
            handles = [self.hvd.broadcast_async_(tensor, root_rank=root, name=f"stage_state.{name}",
                                                 process_set=self.data_set)
                       for name, tensor in model.state_dict().items()]
            for handle in handles:
                self.hvd.synchronize(handle)

    # --- one step ----------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, accum_batches, precision: Precision) -> tuple[float, bool]:
        """Each loader batch through the schedule. Returns, on the last stage, the sum over
        loader batches of their mean micro-batch loss (0 elsewhere: the loss lives there)."""
        m = self.cfg.micro_batches
        loss_sum, finite = 0.0, True
        for batch in accum_batches:
            losses = self._run_schedule(split_into_micro_batches(batch, m), precision, 1.0 / (m * len(accum_batches)))
            if self.coords.is_last_stage:
                value = sum(losses) / m
                finite = finite and math.isfinite(value)
                loss_sum += value if math.isfinite(value) else 0.0
        return loss_sum, finite

    def _run_schedule(self, chunks: list, precision: Precision, loss_weight: float) -> list[float]:
        """Run this stage's actions for one batch; returns the micro-batch losses (last stage)."""
        stage, device = self.stage, self.device
        inputs, outputs, grads, losses = {}, {}, {}, []
        for action in self.actions:
            i, chunk = action.micro, chunks[action.micro]
            shape = (*chunk.inputs.shape, stage.cfg.d_model)  # (B/m, T, C)
            if action.op == RECV_ACT:
                inputs[i] = self.transport.recv(shape, torch.float32, self.previous, 2 * i, device).requires_grad_()
            elif action.op == FORWARD:
                x = chunk.inputs.to(device) if stage.is_first else inputs[i]
                with precision.autocast():
                    out = stage(x)
                if stage.is_last:
                    mask = chunk.loss_mask.to(device) if chunk.loss_mask is not None else None
                    loss = language_model_loss(out, chunk.targets.to(device), mask)
                    losses.append(loss.item())
                    out = loss * loss_weight
                outputs[i] = out
            elif action.op == SEND_ACT:
                self.transport.isend(outputs[i], self.next, 2 * i)
            elif action.op == RECV_GRAD:
                grads[i] = self.transport.recv(shape, torch.float32, self.next, 2 * i + 1, device)
            elif action.op == BACKWARD:
                out = outputs.pop(i)
                if stage.is_last:
                    precision.backward(out)  # scaled by the fp16 loss scale, which every stage shares
                else:
                    torch.autograd.backward(out, grads.pop(i))
            elif action.op == SEND_GRAD:
                self.transport.isend(inputs.pop(i).grad, self.previous, 2 * i + 1)
        self.transport.wait_sends()
        return losses

    def finish_gradients(self, optimizer, step_stats: torch.Tensor) -> torch.Tensor:
        stats = self.hvd.allreduce_async(step_stats, op=self.hvd.Sum, name="step_stats")  # over every rank
        if self.layout.data > 1:
            optimizer.synchronize()
        self._sum_tied_embedding_gradients()
        return self.hvd.synchronize(stats)

    def _tied_parameter(self) -> nn.Parameter | None:
        """This stage's copy of a tied embedding, when the first and last stages differ."""
        gpt = self.stage.gpt
        if not gpt.cfg.tie_weights:
            return None
        if self.stage.is_first:
            return gpt.wte.weight
        return gpt.lm_head.weight if self.stage.is_last else None

    def _sum_tied_embedding_gradients(self) -> None:
        """First and last stage swap their embedding gradients and both add the other's."""
        param = self._tied_parameter()
        if param is None:
            return
        first, last = self.coords.pipeline_group[0], self.coords.pipeline_group[-1]
        peer = last if self.stage.is_first else first
        mine = param.grad if param.grad is not None else torch.zeros_like(param)
        self.transport.isend(mine, peer, tag=TIED_GRADIENT_TAG)
        theirs = self.transport.recv(tuple(param.shape), param.dtype, peer, TIED_GRADIENT_TAG, param.device)
        self.transport.wait_sends()
        param.grad = mine + theirs if self.stage.is_first else theirs + mine

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """The global norm: each stage's squared norm summed over every rank, divided by the
        replicas (which hold equal, averaged gradients); a tied copy counts once."""
        tied_copy = self._tied_parameter() if self.stage.is_last else None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        counted = [p.grad for p in model.parameters() if p.grad is not None and p is not tied_copy]
        local = torch.stack([g.detach().double().square().sum() for g in counted]).sum() if counted else \
            torch.zeros((), dtype=torch.float64)
        total = self.hvd.allreduce(local.cpu(), op=self.hvd.Sum, name="grad_norm_sq") / self.layout.data
        norm = math.sqrt(total.item())  # inf or nan when a gradient is: the step is then skipped
        coefficient = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if coefficient < 1.0:
            for grad in grads:
                grad.mul_(coefficient)
        return norm

    def update(self, optimizer, model: nn.Module, precision: Precision, max_norm: float,
               nonfinite: bool) -> tuple[float, bool]:
        """As for one model, but with fp16 every stage keeps one loss scale: the last stage
        scales the loss, the others receive gradients scaled by it, each unscales its own.
        Whether to step and how the scale moves follow the global norm, which every stage
        sees alike, not each stage's own inf check (a stage with finite gradients must skip
        and back off with the one that overflowed)."""
        scaler = precision.scaler
        if scaler is None or nonfinite:
            return super().update(optimizer, model, precision, max_norm, nonfinite)
        scaler.scale(torch.zeros((), device=self.device))  # a stage without the loss still needs its scale set
        scaler.unscale_(optimizer)
        grad_norm = self.clip_grad_norm_(model, max_norm or math.inf)
        if math.isfinite(grad_norm):
            self.apply_update(optimizer, None)
            scaler.update()  # no stage found an inf: the same growth everywhere
        else:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # skipped, backed off on every stage
        return grad_norm, False  # as with one model: an overflow is the scaler's to handle, not a bad step

    def apply_update(self, optimizer, scaler) -> None:
        if self.layout.data > 1:
            super().apply_update(optimizer, scaler)
        else:
            optimizer.step()

    def forward_only(self, model: nn.Module, inputs: torch.Tensor, precision: Precision) -> torch.Tensor | None:
        """Logits of ``inputs`` (evaluation): on the last stage; None on the others."""
        shape = (*inputs.shape, self.stage.cfg.d_model)
        x = inputs.to(self.device) if self.stage.is_first else \
            self.transport.recv(shape, torch.float32, self.previous, 0, self.device)
        with precision.autocast():
            out = self.stage(x)
        if self.stage.is_last:
            return out
        self.transport.isend(out, self.next, 0)
        self.transport.wait_sends()
        return None

