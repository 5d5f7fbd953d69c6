"""Model shapes by name, and how a ``ModelConfig`` becomes a ``GPTConfig``.

The GPT-3 family follows Brown et al. 2020, Table 2.1 (context 2048, vocabulary 50257).
Two rows of that table are not self-consistent and are adjusted so that the attention width
equals d_model and the parameter count matches the nominal size:
- GPT-3 XL lists 24 heads of 128 (= 3072 != d_model 2048); its 1.3B parameters hold with
  16 heads of 128, as in GPT-Neo 1.3B. We use 16 heads.
- GPT-3 13B lists d_model 5140 with 40 heads of 128 (= 5120); we use d_model 5120, as OPT-13B.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hvdllm.model.gpt import GPTConfig


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    d_model: int
    block_size: int
    vocab_size: int
    nominal_params: float = 0.0  # the size the model is known by, for checks and the planner


PRESETS: dict[str, Preset] = {
    # Tiny models that train on a laptop CPU: tests and the demo.
    "gpt-nano": Preset(n_layer=2, n_head=2, d_model=32, block_size=64, vocab_size=512),
    "gpt-mini": Preset(n_layer=4, n_head=4, d_model=128, block_size=256, vocab_size=4096),
    "gpt-micro": Preset(n_layer=6, n_head=6, d_model=384, block_size=256, vocab_size=8192),
    "gpt2-small": Preset(n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50257,
                         nominal_params=124e6),
    # GPT-3 family, Brown et al. 2020, Table 2.1.
    "gpt3-small": Preset(12, 12, 768, 2048, 50257, 125e6),
    "gpt3-medium": Preset(24, 16, 1024, 2048, 50257, 350e6),
    "gpt3-large": Preset(24, 16, 1536, 2048, 50257, 760e6),
    "gpt3-xl": Preset(24, 16, 2048, 2048, 50257, 1.3e9),
    "gpt3-2.7b": Preset(32, 32, 2560, 2048, 50257, 2.7e9),
    "gpt3-6.7b": Preset(32, 32, 4096, 2048, 50257, 6.7e9),
    "gpt3-13b": Preset(40, 40, 5120, 2048, 50257, 13e9),
    "gpt3-175b": Preset(96, 96, 12288, 2048, 50257, 175e9),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        import difflib

        match = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else f" (known: {', '.join(PRESETS)})"
        raise ValueError(f"unknown model preset {name!r}{hint}")
    return PRESETS[name]


def gpt_config_from(model_cfg, vocab_size: int | None = None) -> GPTConfig:
    """Resolve a ``hvdllm.config.ModelConfig``: preset, then its non-zero fields, then the data's vocab.

    ``vocab_size`` (from the data) is used when ``model.vocab_size`` is 0.
    """
    preset = get_preset(model_cfg.preset)
    shape = {k: getattr(model_cfg, k) or getattr(preset, k)
             for k in ("n_layer", "n_head", "d_model", "block_size")}
    vocab = model_cfg.vocab_size or vocab_size or preset.vocab_size
    return GPTConfig(vocab_size=vocab, dropout=model_cfg.dropout, bias=model_cfg.bias,
                     tie_weights=model_cfg.tie_weights, position=model_cfg.position,
                     init=model_cfg.init, checkpoint_every=model_cfg.checkpoint_every, **shape)


def preset_config(name: str, **overrides) -> GPTConfig:
    """A GPTConfig straight from a preset, e.g. ``preset_config("gpt3-175b")``."""
    p = get_preset(name)
    base = GPTConfig(vocab_size=p.vocab_size, block_size=p.block_size, n_layer=p.n_layer,
                     n_head=p.n_head, d_model=p.d_model)
    return replace(base, **overrides)
