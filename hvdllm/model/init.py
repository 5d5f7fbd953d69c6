"""Weight initialization strategies, chosen by ``model.init``.

- ``gpt2``: N(0, 0.02) for every Linear and Embedding weight, zero biases, and the two
  residual projections of each block (attention out, MLP out) at 0.02 / sqrt(2 * n_layer),
  so that the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
- ``xavier``: Xavier/Glorot uniform for Linear weights (Glorot & Bengio 2010), N(0, 0.02)
  for embeddings.
- ``kaiming``: Kaiming/He normal, fan-in, for Linear weights (He et al. 2015), computed for
  a linear layer (gain 1) since GELU is close to linear near 0; N(0, 0.02) for embeddings.
- ``small``: "small init" (Nguyen & Salazar 2019): N(0, sqrt(2 / (5 d))) everywhere, with
  the residual projections at 2 / (n_layer * sqrt(d)) as in GPT-NeoX ("wang init").

LayerNorm starts at weight 1, bias 0 in all of them. On the meta device these are no-ops,
so building a 175B model there costs no memory.
"""

from __future__ import annotations

import math

from torch import nn


def _residual_std(cfg, base_std: float) -> float:
    if cfg.init == "small":
        return 2.0 / (cfg.n_layer * math.sqrt(cfg.d_model))
    return base_std / math.sqrt(2 * cfg.n_layer)


def init_weights(model: nn.Module, cfg) -> None:
    std = math.sqrt(2.0 / (5 * cfg.d_model)) if cfg.init == "small" else 0.02
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
            continue  # an output head tied to the token embedding keeps the embedding's init
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False) and cfg.init in ("gpt2", "small"):
                nn.init.normal_(module.weight, mean=0.0, std=_residual_std(cfg, std))
            elif cfg.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif cfg.init == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
