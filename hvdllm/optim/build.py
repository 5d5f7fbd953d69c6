"""``build_optimizer``: parameter groups and the optimizer named in the config."""

from __future__ import annotations

import torch
from torch import nn

from hvdllm.choices import OPTIMIZERS
from hvdllm.optim.adafactor import Adafactor
from hvdllm.optim.lamb import Lamb


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two groups: matrices decay; biases, LayerNorm weights (and embeddings unless asked) do not.

    A tensor shared by two modules (a tied embedding / output head) is listed once, and it
    counts as an embedding; so does a pipeline stage's copy of it (marked ``tied_embedding``)
    and a table that is not an ``nn.Embedding`` (a vocabulary-parallel slice, marked
    ``embedding_table``).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding_ids |= {id(p) for p in model.parameters()
                      if getattr(p, "tied_embedding", False) or getattr(p, "embedding_table", False)}
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # named_parameters() yields a shared tensor once
        if not param.requires_grad:
            continue
        is_embedding = id(param) in embedding_ids
        if param.dim() < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW, LAMB or Adafactor over ``param_groups(model)`` from an ``OptimConfig``.

    ``lr`` overrides ``optim_cfg.lr`` (e.g. after scaling with the number of ranks).
    """
    lr = optim_cfg.lr if lr is None else lr
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_embeddings)
    betas = tuple(optim_cfg.betas)
    if optim_cfg.name == "adamw":
        # fused is one kernel for all parameters on CUDA; foreach is the fast path on CPU.
        fused = optim_cfg.fused == "on" or (optim_cfg.fused == "auto" and next(model.parameters()).is_cuda)
        kernel = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=optim_cfg.eps, **kernel)
    if optim_cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=optim_cfg.eps,
                    trust_clip=optim_cfg.trust_clip or None)
    if optim_cfg.name == "adafactor":
        # Factored second moments: O(n + m) state for an n x m matrix (Shazeer & Stern 2018);
        # hvdllm's own, as torch's, but its statistics can span a tensor-parallel group.
        return Adafactor(groups, lr=lr, beta2_decay=-0.8)
    raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}; got {optim_cfg.name!r}")


def state_bytes_held(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds now (under ZeRO, its own share)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))
