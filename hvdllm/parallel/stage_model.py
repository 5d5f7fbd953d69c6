"""A GPT as pipeline stages: the cost of each unit, the cut a config asks for, and the stage
module a rank (or a device) runs.

A stage is the full model with everything outside its blocks removed, so its
``state_dict()`` keys are the full model's ("blocks.3.attn.qkv.weight"): the shards of all
stages merge into the full model's state dict with no renaming. The model is built whole
and seeded before it is cut, so every layout starts from the weights one process would.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hvdllm.model import GPT, GPTConfig
from hvdllm.model.memory import activation_bytes, optimizer_state_bytes
from hvdllm.parallel.partition import UnitCosts, balanced_cut, check_manual_cut, stage_costs
from hvdllm.parallel.schedules import peak_activations


def unit_costs(cfg: GPTConfig, balance: str, seq_len: int, micro_batch: int, optimizer: str = "adamw",
               tensor: int = 1) -> UnitCosts:
    """Costs of the embedding, each block and the head under ``balance`` (params | flops | memory),
    per rank of a tensor group of ``tensor`` (each holds and computes 1/t of every unit; of the
    activations, what Korthikanti et al.'s formula says a rank keeps)."""
    with torch.device("meta"):
        model = GPT(cfg)

    def count(*modules) -> int:
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    embedding = count(model.wte, model.wpe)
    blocks = [count(b) for b in model.blocks]
    head = count(model.ln_f) + model.lm_head.weight.numel()  # a tied head still holds (a copy of) it
    if balance == "params":
        return UnitCosts(embedding / tensor, tuple(n / tensor for n in blocks), head / tensor)
    if balance == "flops":  # per token, forward and backward
        attention = 12 * cfg.d_model * seq_len  # 12 H Q T, with H Q = d_model
        return UnitCosts(0.0, tuple((6 * n + attention) / tensor for n in blocks),
                         6 * cfg.d_model * cfg.vocab_size / tensor)
    # As `hvdllm plan` counts them: bf16 weights and gradients, fp32 optimizer state, and one
    # layer's activations per micro-batch (Korthikanti et al. 2022); the head adds its logits.
    def static(*modules) -> float:
        whole = 4 * count(*modules) + sum(optimizer_state_bytes(m, optimizer) for m in modules if m is not None)
        return whole / tensor

    head_static = static(model.ln_f, model.lm_head)  # a tied head still holds (a copy of) its weight
    acts = activation_bytes(cfg, micro_batch, seq_len, tensor, False) / cfg.n_layer
    return UnitCosts(static(model.wte, model.wpe), tuple(static(b) for b in model.blocks),
                     head_static + 4 * micro_batch * seq_len * cfg.vocab_size / tensor, (acts,) * len(blocks))


def plan_cut(cfg: GPTConfig, parallel_cfg, stages: int, seq_len: int, micro_batch: int,
             optimizer: str = "adamw") -> tuple[list[int], list[float]]:
    """Blocks per stage (``parallel.stage_layers``, else balanced by ``parallel.balance``) and
    each stage's cost per rank (its tensor group, ``parallel.tensor``, dividing it)."""
    costs = unit_costs(cfg, parallel_cfg.balance, seq_len, micro_batch, optimizer, parallel_cfg.tensor)
    held = peak_activations(parallel_cfg.schedule, stages, parallel_cfg.micro_batches).__getitem__

    if parallel_cfg.stage_layers:
        cut = check_manual_cut(parallel_cfg.stage_layers, stages, cfg.n_layer)
    else:
        cut = balanced_cut(costs, stages, held)
    return cut, stage_costs(costs, cut, held)


class GPTStage(nn.Module):
    """Blocks [start, stop) of a GPT, with the embedding on the first stage and the head on the
    last. Input: token ids (B, T) on the first stage, else activations (B, T, C). Output:
    logits (B, T, V) on the last stage, else activations (B, T, C)."""

    def __init__(self, model: GPT, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.is_first, self.is_last = start == 0, stop == len(model.blocks)
        for i in range(len(model.blocks)):
            if not start <= i < stop:
                model.blocks[i] = nn.Identity()  # keeps the indices, so keys stay the full model's
        if not self.is_first:
            if self.is_last and model.cfg.tie_weights:
                # Now a copy of the embedding: optimized as one (no weight decay by default).
                model.lm_head.weight.tied_embedding = True
            model.wte = model.wpe = model.drop = None
        if not self.is_last:
            if self.is_first and model.cfg.tie_weights:
                # The original of that copy: the two add their gradients (pipeline.py), and ZeRO
                # gives both to the same data rank.
                model.wte.weight.tied_embedding = True
            model.ln_f = model.lm_head = None
        self.gpt = model

    @property
    def cfg(self) -> GPTConfig:
        return self.gpt.cfg

    @property
    def loss_function(self):
        return self.gpt.loss_function

    def activation_spec(self, tokens_shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of the activations between stages for a micro-batch of
        ``tokens_shape`` (B, T): the residual stream (B, T, C) (T / t under sequence parallelism),
        in the weights' dtype (under autocast the blocks' low-precision outputs are added to it
        and promoted)."""
        dtype = next(p.dtype for p in self.parameters() if p.is_floating_point())
        batch, time = tokens_shape
        return (batch, time // self.gpt.sequence_shards, self.cfg.d_model), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self.gpt.embed(x)
        x = self.gpt.run_blocks(x, self.start, self.stop)
        return self.gpt.head(x) if self.is_last else x

    # A shard's keys are the full model's (no "gpt." prefix), so shards merge into a GPT's.
    def state_dict(self, *args, **kwargs):
        return self.gpt.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.gpt.load_state_dict(state_dict, strict=strict, assign=assign)


def cut_model(model: GPT, blocks_per_stage: list[int], stage: int) -> GPTStage:
    """Stage ``stage`` of ``model`` (consumed: its other parts are dropped)."""
    start = sum(blocks_per_stage[:stage])
    return GPTStage(model, start, start + blocks_per_stage[stage])


def build_model_parts(model: GPT, blocks_per_stage: list[int], stages: Sequence[int]) -> list[GPTStage]:
    """The parts a rank holds: stages ``stages`` of ``model`` (one, or several under an
    interleaved schedule), in that order. ``model`` is consumed. The parts share the model's
    parameter tensors (nothing is copied), so an embedding tied to the head stays one tensor
    when its stages are on the same rank."""
    return [cut_model(_shell(model), blocks_per_stage, stage) for stage in stages]


def _shell(model: GPT) -> GPT:
    """A new GPT module over the same submodules: cutting it drops modules from the shell,
    not from ``model`` or its other shells."""
    shell = copy.copy(model)
    shell._modules = dict(model._modules)
    shell.blocks = nn.ModuleList(list(model.blocks))
    return shell


class PlacedGPT(nn.Module):
    """One process driving several devices (Horovod's classic layout: Horovod data parallel
    across processes, layers placed across the GPUs of each): the blocks cut into contiguous
    stages, each on its device, the embedding on the first and the head on the last.

    The batch is split into micro-batches that are forwarded one after another; CUDA kernels
    are launched asynchronously, so the first device starts micro-batch i + 1 while the next
    works on micro-batch i, and autograd runs each device's backward on its own thread. A
    tied output projection reads the embedding's weight through ``.to()``, so its gradient
    flows back to the one copy. The loss is taken over the whole batch at once, exactly as the
    unplaced model's.
    """

    def __init__(self, model: GPT, blocks_per_stage: list[int], devices: list[torch.device],
                 micro_batches: int) -> None:
        super().__init__()
        self.gpt, self.devices, self.micro_batches = model, devices, micro_batches
        self.bounds, start = [], 0
        for count, device in zip(blocks_per_stage, devices):
            self.bounds.append((start, start + count))
            for i in range(start, start + count):
                model.blocks[i].to(device)
            start += count
        for module in (model.wte, model.wpe):
            if module is not None:
                module.to(devices[0])
        model.ln_f.to(devices[-1])
        if not model.cfg.tie_weights:
            model.lm_head.to(devices[-1])

    @property
    def cfg(self) -> GPTConfig:
        return self.gpt.cfg

    @property
    def loss_function(self):
        return self.gpt.loss_function

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None):
        gpt, last = self.gpt, self.devices[-1]
        parts = []
        for chunk in idx.chunk(self.micro_batches):
            x = gpt.embed(chunk.to(self.devices[0], non_blocking=True))  # (b, T, C)
            for (start, stop), device in zip(self.bounds, self.devices):
                x = gpt.run_blocks(x.to(device, non_blocking=True), start, stop)
            parts.append(F.linear(gpt.ln_f(x.to(last)), gpt.lm_head.weight.to(last)))  # (b, T, V)
        logits = torch.cat(parts)
        if targets is None:
            return logits, None
        mask = loss_mask.to(last) if loss_mask is not None else None
        return logits, self.gpt.loss_function(logits, targets.to(last), mask)

    # Checkpoints hold the plain model's keys: a placed run resumes unplaced and vice versa.
    def state_dict(self, *args, **kwargs):
        return self.gpt.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.gpt.load_state_dict(state_dict, strict=strict, assign=assign)
