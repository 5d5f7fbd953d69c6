"""Bytes a GPT needs in training: optimizer state and activations (the formulas are
sourced in hvdllm/plan.py's docstring). Used by the planner and the pipeline partitioner."""

from __future__ import annotations

from torch import nn

from hvdllm.choices import OPTIMIZERS


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """fp32 optimizer state of ``model``'s parameters, the master copy included."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if optimizer == "adamw":
        return 12 * total
    if optimizer == "lamb":  # hvdllm's Lamb also keeps an fp32 workspace for the update
        return 16 * total
    if optimizer == "adafactor":
        factored = sum(p.shape[-2] + p.shape[-1] if p.dim() >= 2 else p.numel() for p in params)
        return 4 * total + 4 * factored
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")


def activation_bytes(cfg, micro_batch: int, seq_len: int, tp: int, checkpointing: bool,
                     sequence_parallel: bool = False) -> int:
    """Activations kept for backward by all layers of one micro-batch (Korthikanti et al. 2022,
    eq. 2; eq. 4 with sequence parallelism, which also splits the LayerNorm and dropout regions'
    10 s b h bytes, and each checkpointed layer input, over the t ranks)."""
    s, b, h, a, L = seq_len, micro_batch, cfg.d_model, cfg.n_head, cfg.n_layer
    replicated = 10 / tp if sequence_parallel else 10
    per_layer = s * b * h * (replicated + 24 / tp + 5 * a * s / (h * tp))
    if checkpointing:
        layer_input = 2 * s * b * h / (tp if sequence_parallel else 1)
        return int(L * layer_input + per_layer)
    return int(L * per_layer)


def parameter_count(cfg) -> int:
    """The parameters of hvdllm's GPT of GPTConfig ``cfg`` (tied weights once), from its shape
    alone: a model too large to build can be refused before it is built."""
    C, bias = cfg.d_model, cfg.bias
    # qkv, attention out, MLP in and out (12 C^2), two LayerNorms; biases on all six.
    block = 12 * C * C + 2 * C + (11 * C if bias else 0)
    embeddings = cfg.vocab_size * C + (cfg.block_size * C if cfg.position == "learned" else 0)
    head = 0 if cfg.tie_weights else cfg.vocab_size * C
    return cfg.n_layer * block + embeddings + head + C + (C if bias else 0)  # + the final LayerNorm
