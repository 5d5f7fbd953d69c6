"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): every block split across the t ranks
of a tensor group.

Attention's query/key/value projection and the MLP's first layer are column-parallel (each
rank computes its heads or its quarter of the hidden units), the attention output and the
MLP's second layer row-parallel (each rank multiplies its slice of the input; the partial
outputs are summed): one all-reduce per block half in forward (``g``) and one in backward
(``f``, the gradient of the replicated input). The embedding and the LM head are split by
vocabulary; :mod:`hvdllm.parallel.vocab_parallel_loss` takes the loss from each rank's slice
of the logits with three small all-reduces and never gathers them. A tied embedding stays tied:
the head's slice is the embedding's.

:func:`apply_tensor_parallel` slices a whole, seeded model in place, so t ranks start from the
weights one process would; :func:`tensor_split` says, per parameter name, how it is cut, and
:func:`merge_tensor_shards` puts the shards of a checkpoint back together.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hvdllm.comm.groups import Group
from hvdllm.errors import UserError
from hvdllm.model.gpt import GPT, apply_rope, rope_tables
from hvdllm.parallel.vocab_parallel_loss import VocabParallelLoss

SPLIT_ATTRIBUTE = "tensor_parallel_split"  # the dimension a parameter is cut along, on those each rank holds a slice of
SEQUENCE_ATTRIBUTE = "sequence_parallel_partial"  # replicated parameters whose gradients each rank has in part


# --- the conjugate operators f and g ------------------------------------------------------------
class _CopyToTensorRegion(torch.autograd.Function):
    """f: identity forward; backward sums the input's gradient over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.allreduce_(grad.contiguous().clone()), None


class _ReduceFromTensorRegion(torch.autograd.Function):
    """g: forward sums the partial outputs over the group; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return group.allreduce_(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _along_time(collective, x: torch.Tensor) -> torch.Tensor:
    """A collective along dimension 1 (time) of x (B, T, C), through its dimension-0 form."""
    return collective(x.transpose(0, 1).contiguous()).transpose(0, 1)


class _GatherSequence(torch.autograd.Function):
    """Sequence parallelism's entry to a split region: all-gather along time forward,
    reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _along_time(group.all_gather, x)

    @staticmethod
    def backward(ctx, grad):
        return _along_time(ctx.group.reduce_scatter, grad), None


class _ScatterSequence(torch.autograd.Function):
    """Sequence parallelism's exit from a split region: reduce-scatter along time forward,
    all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _along_time(group.reduce_scatter, x)

    @staticmethod
    def backward(ctx, grad):
        return _along_time(ctx.group.all_gather, grad), None


class _SliceSequence(torch.autograd.Function):
    """This rank's part of a replicated (B, T, C) along time forward; all-gather backward (every
    rank's gradient of the replicated tensor complete)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        if x.shape[1] % group.size:
            raise UserError(f"a sequence of {x.shape[1]} tokens does not divide over parallel.tensor={group.size} "
                            f"ranks (parallel.sequence_parallel): use a sequence length that does")
        return x.chunk(group.size, dim=1)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _along_time(ctx.group.all_gather, grad), None


def copy_to_tensor_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromTensorRegion.apply(x, group)


@contextmanager
def split_region_rng(group: Group, device: torch.device) -> Iterator[None]:
    """Random numbers for a region split across the group (attention's dropout over this
    rank's heads): a stream of this rank's own, seeded from one draw of the shared stream plus
    the rank, so masks differ across the group while the shared stream (the replicated
    regions' dropout) advances alike on every rank. Activation checkpointing restores the shared
    stream before recomputing, so the recomputation draws the same masks (Megatron's RNG
    tracker, without a tracker)."""
    seed = int(torch.randint(2**62, (1,)).item()) + group.rank
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


# --- how each parameter is cut -------------------------------------------------------------------
def tensor_split(name: str) -> tuple[int, int] | None:
    """(dimension, interleaved parts) along which parameter ``name`` of a GPT is split, or None
    for a replicated one. The fused query/key/value projection is three matrices stacked: each
    rank takes its heads' rows of each (3 parts)."""
    leaf = name.rsplit(".", 2)[-2:]
    if leaf[0] == "qkv":
        return 0, 3
    if leaf == ["fc", "weight"] or leaf == ["fc", "bias"] or name in ("wte.weight", "lm_head.weight"):
        return 0, 1
    if leaf == ["proj", "weight"]:
        return 1, 1
    return None


def shard_of(full: torch.Tensor, dim: int, parts: int, rank: int, ranks: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` along ``dim`` (each of ``parts`` stacked blocks cut alike)."""
    blocks = full.chunk(parts, dim=dim)
    return torch.cat([block.chunk(ranks, dim=dim)[rank] for block in blocks], dim=dim).clone()


def merge_slices(name: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """The whole of split parameter ``name`` (or a tensor cut as it is) from the tensor ranks'
    slices, in rank order: the inverse of :func:`shard_of`."""
    dim, parts = tensor_split(name)
    pieces = [piece.chunk(parts, dim=dim) for piece in slices]
    return torch.cat([torch.cat([p[i] for p in pieces], dim=dim) for i in range(parts)], dim=dim)


def merge_tensor_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole model's state dict from the tensor ranks' state dicts, in rank order."""
    return {name: first if tensor_split(name) is None else merge_slices(name, [shard[name] for shard in shards])
            for name, first in shards[0].items()}


# --- the split layers ------------------------------------------------------------------------------
def enter_split_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """A column-parallel layer's input: replicated (``f``), or gathered from the sequence's parts."""
    return _GatherSequence.apply(x, group) if sequence_parallel else copy_to_tensor_region(x, group)


def leave_split_region(partial: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """A row-parallel layer's partial output summed: replicated (``g``), or this rank's part of the
    sequence."""
    return _ScatterSequence.apply(partial, group) if sequence_parallel else reduce_from_tensor_region(partial, group)


class SequenceDropout(nn.Module):
    """Dropout where the residual stream is split along the sequence: each rank's part draws
    its own masks."""

    def __init__(self, dropout: nn.Dropout, group: Group) -> None:
        super().__init__()
        self.dropout, self.group = dropout, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout.p == 0:
            return x
        with split_region_rng(self.group, x.device):
            return self.dropout(x)


class TensorParallelAttention(nn.Module):
    """Causal self-attention over this rank's heads (column-parallel qkv, row-parallel proj)."""

    def __init__(self, attn: nn.Module, group: Group, n_head: int, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.rope, self.dropout = group, attn.rope, attn.dropout
        self.sequence_parallel = sequence_parallel
        self.local_heads = n_head // group.size
        self.qkv, self.proj = attn.qkv, attn.proj
        self.resid_dropout = SequenceDropout(attn.resid_dropout, group) if sequence_parallel else attn.resid_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_split_region(x, self.group, self.sequence_parallel)
        B, T, _ = x.shape
        head_dim = self.qkv.weight.shape[0] // (3 * self.local_heads)
        q, k, v = self.qkv(x).split(self.local_heads * head_dim, dim=2)
        # (B, T, H/t * D) -> (B, H/t, T, D)
        q, k, v = (t.view(B, T, self.local_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            cos, sin = rope_tables(T, head_dim, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.training and self.dropout > 0:
            with split_region_rng(self.group, x.device):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, self.local_heads * head_dim)
        return self.resid_dropout(row_parallel(self.proj, y, self.group, self.sequence_parallel))


class TensorParallelMLP(nn.Module):
    """The MLP over this rank's hidden units (column-parallel fc, row-parallel proj)."""

    def __init__(self, mlp: nn.Module, group: Group, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.fc, self.proj, self.sequence_parallel = group, mlp.fc, mlp.proj, sequence_parallel
        self.dropout = SequenceDropout(mlp.dropout, group) if sequence_parallel else mlp.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc(enter_split_region(x, self.group, self.sequence_parallel)), approximate="tanh")
        return self.dropout(row_parallel(self.proj, hidden, self.group, self.sequence_parallel))


def row_parallel(linear: nn.Linear, x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """A row-parallel layer: this rank's partial product summed over the group (or scattered
    over the sequence's parts), then the (replicated) bias once."""
    out = leave_split_region(F.linear(x, linear.weight), group, sequence_parallel)
    return out + linear.bias if linear.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + V/t) of the token table; other ids give zeros here and
    their row on the rank that holds it, summed over the group."""

    def __init__(self, embedding: nn.Embedding, group: Group, start: int) -> None:
        super().__init__()
        self.group, self.start, self.weight = group, start, embedding.weight
        self.weight.embedding_table = True  # optimized as an embedding (hvdllm.optim.build.param_groups)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_region(rows, self.group)


class VocabParallelHead(nn.Module):
    """The LM head's rows for this rank's vocabulary slice: logits (B, T, V/t)."""

    def __init__(self, head: nn.Linear, group: Group, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.weight, self.sequence_parallel = group, head.weight, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_split_region(x, self.group, self.sequence_parallel), self.weight)


class SequenceSplit(nn.Module):
    """Where the embedding's replicated output enters the sequence-split residual stream: this
    rank's part of the sequence, then dropout with masks of its own."""

    def __init__(self, dropout: nn.Dropout, group: Group) -> None:
        super().__init__()
        self.group, self.dropout = group, SequenceDropout(dropout, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(_SliceSequence.apply(x, self.group))


# --- the transform -----------------------------------------------------------------------------------
def apply_tensor_parallel(model: GPT, group: Group, sequence_parallel: bool = False) -> GPT:
    """Split ``model`` (whole, or a pipeline stage's GPT with other parts removed) in place for
    this rank of ``group``; returns it. Parameters are replaced by this rank's slices of the
    whole model's and marked with :data:`SPLIT_ATTRIBUTE`. With ``sequence_parallel`` the
    residual stream between the split regions is cut along the sequence (Korthikanti et al.
    2022): LayerNorms and dropout see T/t tokens, and the parameters they (and the row-parallel
    biases) hold get partial gradients, marked with :data:`SEQUENCE_ATTRIBUTE`, to be summed
    over the group."""
    rank, ranks = group.rank, group.size
    vocab = model.cfg.vocab_size
    if vocab % ranks:
        raise UserError(f"model.vocab_size={vocab} does not divide over parallel.tensor={ranks} ranks: set "
                        f"model.vocab_size to a multiple of {ranks} (e.g. {-(-vocab // ranks) * ranks})")
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            split = tensor_split(name)
            if split is not None:
                _replace_parameter(model, name, shard_of(param.data, *split, rank, ranks), split[0])
        if model.cfg.tie_weights and model.wte is not None and model.lm_head is not None:
            model.lm_head.weight = model.wte.weight
    vocab_start = rank * (model.cfg.vocab_size // ranks)
    for block in model.blocks:
        if isinstance(block, nn.Identity):  # another pipeline stage's block
            continue
        block.attn = TensorParallelAttention(block.attn, group, model.cfg.n_head, sequence_parallel)
        block.mlp = TensorParallelMLP(block.mlp, group, sequence_parallel)
        if sequence_parallel:
            _mark_sequence_parallel(block.ln_1, block.ln_2, block.attn.proj.bias, block.mlp.proj.bias)
    if model.wte is not None:
        model.wte = VocabParallelEmbedding(model.wte, group, vocab_start)
        if sequence_parallel:
            model.drop = SequenceSplit(model.drop, group)
    if model.lm_head is not None:
        model.lm_head = VocabParallelHead(model.lm_head, group, sequence_parallel)
        if sequence_parallel:
            _mark_sequence_parallel(model.ln_f)
    if sequence_parallel:
        model.sequence_shards = ranks
    model.loss_function = VocabParallelLoss(group, vocab_start)
    return model


def split_dim(param: torch.Tensor) -> int | None:
    """The dimension ``param`` is cut along over its tensor group, or None when it is replicated."""
    return getattr(param, SPLIT_ATTRIBUTE, None)


class TensorGroupSplit:
    """The tensor group as the optimizers see it (:class:`hvdllm.optim.split.SplitParameters`)."""

    def __init__(self, group: Group) -> None:
        self.group, self.ranks = group, group.size

    split_dim = staticmethod(split_dim)

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        return self.group.allreduce_(values)


def _mark_sequence_parallel(*parts) -> None:
    for part in parts:
        params = part.parameters() if isinstance(part, nn.Module) else [part]
        for param in params:
            if param is not None:
                setattr(param, SEQUENCE_ATTRIBUTE, True)


def _replace_parameter(model: nn.Module, name: str, value: torch.Tensor, dim: int) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, leaf)
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)  # marks such as tied_embedding
    setattr(new, SPLIT_ATTRIBUTE, dim)
    setattr(owner, leaf, new)
