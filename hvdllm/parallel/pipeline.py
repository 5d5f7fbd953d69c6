"""Pipeline parallelism across ranks, with Horovod data parallelism inside each stage:
:class:`PipelineExecutor` runs a rank's schedule over its model parts, activations travelling
over the pipeline group's MPI communicator (:mod:`hvdllm.comm.p2p`).
Data, loss, norms and tied embeddings across stages: docs/design/parallel.md (Pipeline parallelism).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from hvdllm.optim.adafactor import Adafactor
from hvdllm.optim.lamb import Lamb
from hvdllm.parallel.gradients import clip_to_norm, squares
from hvdllm.parallel.precision import Precision
from hvdllm.comm.groups import HorovodReduction
from hvdllm.comm.p2p import MpiTransport
from hvdllm.parallel.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action,
                                       bubble_fraction, build_schedule, stage_rank)
from hvdllm.parallel.stage_model import GPTStage, cut_model, plan_cut
from hvdllm.parallel.sync import HorovodDataParallel
from hvdllm.parallel.tensor import SEQUENCE_ATTRIBUTE, TensorGroupSplit, apply_tensor_parallel, split_dim


# MPI guarantees tags up to 32767: a transfer to a rank's c-th stage of micro-batch i uses
# 2 (i v + c) (activations) and + 1 (gradients), below it for m v < 16383 (the config bounds m;
# a rank holds one stage, v = 1, until interleaved schedules come).
TIED_GRADIENT_TAG = 32767


def transfer_tag(kind: str, stage: int, micro: int, ranks: int, virtual_stages: int) -> int:
    """The tag of a transfer to ``stage`` (``kind`` "act") or from it (``kind`` "grad")."""
    return 2 * (micro * virtual_stages + stage // ranks) + (1 if kind == "grad" else 0)


def split_into_micro_batches(batch, parts: int) -> list:
    """A loader batch as ``parts`` pipeline micro-batches of equal size (same fields, rows split)."""
    fields = {name: getattr(batch, name) for name in ("inputs", "targets", "loss_mask")}
    chunks = {name: value.chunk(parts) if value is not None else [None] * parts for name, value in fields.items()}
    return [type(batch)(**{name: chunks[name][i] for name in fields}) for i in range(parts)]


class PipelineExecutor:
    """Runs one rank's actions (schedules.py) over its model parts for one batch.

    ``parts`` maps each stage this rank holds to its module; transfers go to the rank of the
    neighbouring stage on the pipeline's communicator (``transport``). Activations and their
    gradients take the shape and dtype the stage says (:meth:`GPTStage.activation_spec`).
    """

    def __init__(self, parts: dict[int, GPTStage], actions: list[Action], transport, ranks: int, stages: int,
                 device: torch.device) -> None:
        self.parts, self.actions, self.transport = parts, actions, transport
        self.ranks, self.stages, self.device = ranks, stages, device
        self.virtual_stages = stages // ranks

    def _tag(self, kind: str, stage: int, micro: int) -> int:
        return transfer_tag(kind, stage, micro, self.ranks, self.virtual_stages)

    def run(self, chunks: list, precision: Precision, loss_weight: float) -> list[float]:
        """Every action once; returns the micro-batch losses (on the rank of the last stage)."""
        inputs, outputs, grads, losses = {}, {}, {}, []
        last = self.stages - 1
        for action in self.actions:
            s, i = action.stage, action.micro
            part, chunk = self.parts[s], chunks[i]
            shape, dtype = part.activation_spec(tuple(chunk.inputs.shape))
            if action.op == RECV_ACT:
                inputs[s, i] = self.transport.recv(shape, dtype, stage_rank(s - 1, self.ranks), self._tag("act", s, i),
                                                   self.device).requires_grad_()
            elif action.op == FORWARD:
                if s == 0:
                    x = chunk.inputs.to(self.device)
                elif (s, i) in inputs:
                    x = inputs[s, i]
                else:  # the previous stage is on this rank: its output, cut from its graph
                    x = inputs[s, i] = outputs[s - 1, i].detach().requires_grad_()
                with precision.autocast():
                    out = part(x)
                if s == last:
                    mask = chunk.loss_mask.to(self.device) if chunk.loss_mask is not None else None
                    loss = part.loss_function(out, chunk.targets.to(self.device), mask)
                    losses.append(loss.item())
                    out = loss * loss_weight
                outputs[s, i] = out
            elif action.op == SEND_ACT:
                self.transport.isend(outputs[s, i], stage_rank(s + 1, self.ranks), self._tag("act", s + 1, i))
            elif action.op == RECV_GRAD:
                grads[s, i] = self.transport.recv(shape, dtype, stage_rank(s + 1, self.ranks),
                                                  self._tag("grad", s + 1, i), self.device)
            elif action.op == BACKWARD:
                out = outputs.pop((s, i))
                if s == last:
                    precision.backward(out)  # scaled by the fp16 loss scale, which every stage shares
                else:
                    grad = grads.pop((s, i), None)
                    if grad is None:  # the next stage is on this rank
                        grad = inputs.pop((s + 1, i)).grad
                    torch.autograd.backward(out, grad)
            elif action.op == SEND_GRAD:
                self.transport.isend(inputs.pop((s, i)).grad, stage_rank(s - 1, self.ranks), self._tag("grad", s, i))
        if self.transport is not None:  # None when every stage is on this rank
            self.transport.wait_sends()
        return losses


class ModelParallel(HorovodDataParallel):
    """Each rank one model part: a pipeline stage (one stage: the whole model), split across a
    tensor group when ``parallel.tensor > 1``; each part's replicas a data group, updated by the
    rule. With one stage the schedule runs the micro-batches one after the other."""

    def __init__(self, cfg, layout, rule) -> None:
        super().__init__(cfg, layout, rule)
        self.stage: GPTStage | None = None

    def named_groups(self) -> dict:
        return {**super().named_groups(), ("pipeline",): self.layout.groups(("pipeline",)),
                ("tensor",): self.layout.groups(("tensor",))}

    needs_mpi = True  # activations travel point to point; tensor groups reduce over MPI

    def setup(self, threads: int) -> None:
        super().setup(threads)
        self.transport = MpiTransport(self.groups.group(("pipeline",)).mpi)
        self.pipeline_rank = self.coords.stage  # this rank's index in its pipeline's communicator
        group = self.groups.group(("tensor",))
        self.tensor_group = group if self.cfg.tensor_backend == "mpi4py" else HorovodReduction(group, self.hvd)

    @property
    def reports_loss(self) -> bool:
        return self.coords.is_last_stage and self.coords.tensor_rank == 0

    def wrap_optimizer(self, optimizer, model: nn.Module):
        # After wrapping: Horovod's DistributedOptimizer is a new instance of the optimizer's class.
        optimizer = super().wrap_optimizer(optimizer, model)
        if self.layout.tensor > 1 and isinstance(optimizer, (Lamb, Adafactor)):  # statistics of whole tensors
            optimizer.split = TensorGroupSplit(self.tensor_group)
        return optimizer

    @property
    def backward_passes_per_step(self) -> int:
        return self.cfg.accum_steps * self.cfg.micro_batches

    def parallelize(self, model: nn.Module, device: torch.device) -> nn.Module:
        cfg = self.run_cfg
        self.micro_batch = max(1, cfg.data.batch_size // self.cfg.micro_batches)
        stages = self.layout.pipeline
        self.cut, _ = plan_cut(model.cfg, self.cfg, stages, cfg.data.seq_len or model.cfg.block_size,
                               self.micro_batch, cfg.optim.name)
        self.device = device
        self.stage = cut_model(model, self.cut, self.coords.stage)
        if self.layout.tensor > 1:
            apply_tensor_parallel(self.stage.gpt, self.tensor_group, self.cfg.sequence_parallel)
        self.stage.to(device)
        schedule = build_schedule(self.cfg.schedule, stages, self.cfg.micro_batches)
        self.executor = PipelineExecutor({self.coords.stage: self.stage}, schedule[self.pipeline_rank],
                                         self.transport, stages, stages, device)
        return self.stage

    def pipeline_cut(self) -> list[int] | None:
        return list(self.cut) if self.layout.pipeline > 1 else None

    def banner_notes(self) -> list[str]:
        notes = super().banner_notes()
        if self.layout.pipeline > 1:
            p, m = self.layout.pipeline, self.cfg.micro_batches
            notes.append(f"pipeline     {p} stages of {', '.join(map(str, self.cut))} blocks, schedule "
                         f"{self.cfg.schedule}, {m} micro-batches of {self.micro_batch}: expected bubble "
                         f"{bubble_fraction(p, m):.0%} ((p - 1) / (m + p - 1) with equal stages)")
        return notes

    def broadcast_replica(self, model: nn.Module, optimizer) -> None:
        # Every replica is built from the same seed, or loads the same shard on resume; the
        # broadcast inside the stage's process set is a guarantee, not a necessity.
        if self.layout.data > 1:
            root = self.coords.data_group[0]  # a global rank, a member of the process set
            data_set = self.groups.group(("data",)).process_set
            handles = [self.hvd.broadcast_async_(tensor, root_rank=root, name=f"stage_state.{name}",
                                                 process_set=data_set)
                       for name, tensor in model.state_dict().items()]
            for handle in handles:
                self.hvd.synchronize(handle)

    # --- one step ----------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, accum_batches, precision: Precision) -> tuple[float, bool]:
        """Each accumulation batch through the schedule. Returns, on the last stage, the sum over
        them of their mean micro-batch loss (0 elsewhere: the loss lives there)."""
        m = self.cfg.micro_batches
        loss_sum, finite = 0.0, True
        start = time.perf_counter()
        for batch in accum_batches:
            losses = self.executor.run(split_into_micro_batches(batch, m), precision, 1.0 / (m * len(accum_batches)))
            if self.reports_loss:
                value = sum(losses) / m
                finite = finite and math.isfinite(value)
                loss_sum += value if math.isfinite(value) else 0.0
        self.inject_slowdown(time.perf_counter() - start)
        return loss_sum, finite

    def after_gradients(self) -> None:
        self._sum_sequence_parallel_gradients()
        self._sum_tied_embedding_gradients()

    def _sum_sequence_parallel_gradients(self) -> None:
        """Collective in the tensor group: under sequence parallelism each rank's replicated
        LayerNorm and bias gradients come from its part of the sequence: summed, in one message."""
        grads = [p.grad for p in self.stage.parameters()
                 if getattr(p, SEQUENCE_ATTRIBUTE, False) and p.grad is not None]
        if not grads:
            return
        flat = self.tensor_group.allreduce_(torch.cat([g.reshape(-1) for g in grads]))
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(summed.view_as(grad))

    def _tied_parameter(self) -> nn.Parameter | None:
        """This stage's copy of a tied embedding, when the first and last stages differ."""
        gpt = self.stage.gpt
        if not gpt.cfg.tie_weights or self.layout.pipeline == 1:
            return None
        if self.stage.is_first:
            return gpt.wte.weight
        return gpt.lm_head.weight if self.stage.is_last else None

    def _sum_tied_embedding_gradients(self) -> None:
        """First and last stage swap their embedding gradients and both add the other's."""
        param = self._tied_parameter()
        if param is None:
            return
        peer = self.layout.pipeline - 1 if self.stage.is_first else 0
        mine = param.grad if param.grad is not None else torch.zeros_like(param)
        self.transport.isend(mine, peer, tag=TIED_GRADIENT_TAG)
        theirs = self.transport.recv(tuple(param.shape), param.dtype, peer, TIED_GRADIENT_TAG, param.device)
        self.transport.wait_sends()
        param.grad = mine + theirs if self.stage.is_first else theirs + mine

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """The norm of this replica's gradients: a stage's split parameters' squares summed over
        its tensor group, its replicated ones' counted once, and the stages' sums added over the
        pipeline (small collectives on MPI communicators; with averaged gradients every
        replica's is the global norm); a tied copy counts once."""
        tied_copy = self._tied_parameter() if self.stage.is_last else None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        counted = [p for p in model.parameters() if p.grad is not None and p is not tied_copy]
        split = [p for p in counted if split_dim(p) is not None]
        replicated = [p for p in counted if split_dim(p) is None]
        stage_sum = self.update_rule.sum_squares(self.tensor_group.sum(squares(split)) + squares(replicated))
        total = self.groups.group(("pipeline",)).sum(stage_sum)
        return self.update_rule.agree_norm(clip_to_norm(grads, math.sqrt(total), max_norm))

    def update(self, optimizer, model: nn.Module, precision: Precision, max_norm: float,
               nonfinite: bool) -> tuple[float, bool]:
        """As for one model, but with fp16 every stage keeps one loss scale: the last stage
        scales the loss, the others receive gradients scaled by it, each unscales its own.
        Whether to step and how the scale moves follow the global norm, which every stage
        sees alike, not each stage's own inf check (a stage with finite gradients must skip
        and back off with the one that overflowed)."""
        if precision.scaler is None or nonfinite:
            return super().update(optimizer, model, precision, max_norm, nonfinite)
        result = self.scaled_update_on_the_global_norm(optimizer, model, precision.scaler, max_norm)
        self.update_rule.after_update()
        return result

    def forward_only(self, model: nn.Module, inputs: torch.Tensor, precision: Precision) -> torch.Tensor | None:
        """Logits of ``inputs`` (evaluation): on the last stage; None on the others."""
        shape, dtype = self.stage.activation_spec(tuple(inputs.shape))
        x = inputs.to(self.device) if self.stage.is_first else \
            self.transport.recv(shape, dtype, self.pipeline_rank - 1, 0, self.device)
        with precision.autocast():
            out = self.stage(x)
        if self.stage.is_last:
            return out
        self.transport.isend(out, self.pipeline_rank + 1, 0)
        self.transport.wait_sends()
        return None

