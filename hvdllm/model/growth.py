"""Function-preserving growth: a deeper and/or wider GPT whose outputs, before any step, are
those of a smaller trained one (seed §7.3: pre-train small, carry it over to the large one).

Width (Net2WiderNet, Chen et al. 2016, for pre-LayerNorm transformers as in Shen et al. 2022):
``d_model`` grows by a whole factor ``m`` with ``n_head`` grown alike, so the head dimension
is kept. The residual stream becomes ``m`` copies of the small one, ``[x, x, ..., x]``, and
every part keeps that shape:
- embeddings and LayerNorm gains and biases are tiled (a LayerNorm of ``m`` copies has the
  copies' mean and variance, so it gives ``m`` copies of its output);
- every Linear tiles its output units (the heads of the attention, the MLP's hidden units),
  so each new head or unit is a copy of an old one, and reads its ``m`` input copies with
  weights ``W * a_c`` whose coefficients ``a_c`` sum to 1 over the copies: the same sum.
  The coefficients carry a little noise (``1/m`` each, plus noise that sums to zero over the
  copies). Without it the copies would get the same gradients and stay copies for ever (the
  model would stay small); with it they differ from the first step, while the function is
  still exactly the small one's for inputs that are copies.
- a tied output head reads the tiled embedding, which would sum the ``m`` copies: the final
  LayerNorm's gain and bias are divided by ``m`` instead.

Depth (stacking, Gong et al. 2019, with zero residual branches): the grown model's block
``j`` starts from the small model's block ``j * L_small // L_big``. The first block mapped to
each small block is that block; the others are its copies with the attention's and the MLP's
output projections at zero, so their residual contributions start at zero (an exact identity)
while their inputs already compute what the copied block does; their gradients are non-zero
from the first step.

Positions beyond the small model's ``block_size`` (learned positions) take the fresh model's
initial rows: no small model ever saw them.
"""

from __future__ import annotations

import torch

from hvdllm.model.gpt import GPTConfig

SPLIT_NOISE = 0.05  # relative spread of the copies' input coefficients around 1/m
_KEPT_EQUAL = ("vocab_size", "position", "bias", "tie_weights")
_OUTPUT_PROJECTIONS = ("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias")


def growth_problem(small: GPTConfig, big: GPTConfig) -> str | None:
    """Why ``small`` cannot grow into ``big`` (one phrase), or None when it can."""
    for name in _KEPT_EQUAL:
        if getattr(small, name) != getattr(big, name):
            return f"model.{name} differs ({getattr(small, name)} -> {getattr(big, name)}): growth keeps it"
    if big.n_layer < small.n_layer or big.block_size < small.block_size:
        return (f"growth cannot shrink (n_layer {small.n_layer} -> {big.n_layer}, "
                f"block_size {small.block_size} -> {big.block_size})")
    factor, rest = divmod(big.d_model, small.d_model)
    if rest or factor < 1 or big.n_head != factor * small.n_head:
        return (f"width grows by a whole factor m with n_head alike (head size kept); d_model "
                f"{small.d_model} -> {big.d_model} with n_head {small.n_head} -> {big.n_head} is not that")
    return None


def grow_state_dict(state: dict[str, torch.Tensor], small: GPTConfig, big: GPTConfig,
                    fresh: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The state dict of ``big`` grown from ``state`` (a model of config ``small``).

    ``fresh`` is a newly built ``big`` model's state dict (it gives the rows of positions no
    small model had); ``generator`` seeds the symmetry-breaking noise, so every rank grows
    the same weights. Raises ValueError when ``growth_problem`` names one.
    """
    problem = growth_problem(small, big)
    if problem:
        raise ValueError(problem)
    widen = _Widening(big.d_model // small.d_model, generator)
    grown = {"wte.weight": widen.tile_columns(state["wte.weight"])}
    if small.position == "learned":
        rows = widen.tile_columns(state["wpe.weight"])
        grown["wpe.weight"] = torch.cat([rows, fresh["wpe.weight"][rows.shape[0]:]])
    divisor = widen.m if small.tie_weights else 1  # a tied head sums the m copies of the embedding
    for name in ("ln_f.weight", "ln_f.bias"):
        if name in state:
            grown[name] = widen.tile(state[name]) / divisor
    grown["lm_head.weight"] = grown["wte.weight"] if small.tie_weights else widen.split_inputs(state["lm_head.weight"])
    wide_blocks = [widen.block({k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")})
                   for i in range(small.n_layer)]
    for j in range(big.n_layer):
        source = j * small.n_layer // big.n_layer
        first = j == 0 or (j - 1) * small.n_layer // big.n_layer != source
        for name, tensor in wide_blocks[source].items():
            grown[f"blocks.{j}.{name}"] = tensor.clone() if first or name not in _OUTPUT_PROJECTIONS \
                else torch.zeros_like(tensor)
    return grown


class _Widening:
    """The width map of one growth: ``m`` copies of each feature of the residual stream."""

    def __init__(self, m: int, generator: torch.Generator) -> None:
        self.m, self.generator = m, generator

    def tile(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-feature vector (LayerNorm gain or bias, a bias of the residual stream)."""
        return vector.repeat(self.m)

    def tile_columns(self, table: torch.Tensor) -> torch.Tensor:
        """An embedding table (rows, d): each row becomes m copies of itself."""
        return table.repeat(1, self.m)

    def split_inputs(self, weight: torch.Tensor) -> torch.Tensor:
        """A Linear weight (out, in) reading m copies of its input: coefficients summing to 1."""
        out, inputs = weight.shape
        noise = torch.randn(out, self.m, inputs, generator=self.generator)
        coefficients = (1 + SPLIT_NOISE * (noise - noise.mean(dim=1, keepdim=True))) / self.m
        return (weight.unsqueeze(1) * coefficients).reshape(out, self.m * inputs)

    def tile_groups(self, tensor: torch.Tensor, groups: int) -> torch.Tensor:
        """Output units in ``groups`` equal groups ([q|k|v]: 3) each tiled m times, so new heads
        and hidden units are copies of old ones and keep their group."""
        shaped = tensor.reshape(groups, tensor.shape[0] // groups, *tensor.shape[1:])
        return shaped.repeat(1, self.m, *([1] * (tensor.dim() - 1))).reshape(-1, *tensor.shape[1:])

    def block(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One block's parameters (names within the block) widened."""
        wide = {}
        for name, tensor in params.items():
            module, kind = name.rsplit(".", 1)
            if module.startswith("ln_"):
                wide[name] = self.tile(tensor)
                continue
            units = self.tile_groups(tensor, 3 if module == "attn.qkv" else 1)
            wide[name] = self.split_inputs(units) if kind == "weight" else units
        return wide
