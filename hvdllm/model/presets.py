"""Model shapes by name, and how a ``ModelConfig`` becomes a ``GPTConfig``.

The GPT-3 family follows Brown et al. 2020, Table 2.1 (context 2048, vocabulary 50257).
Two rows of that table are not self-consistent and are adjusted so that the attention width
equals d_model and the parameter count matches the nominal size:
- GPT-3 XL lists 24 heads of 128 (= 3072 != d_model 2048); its 1.3B parameters hold with
  16 heads of 128, as in GPT-Neo 1.3B. We use 16 heads.
- GPT-3 13B lists d_model 5140 with 40 heads of 128 (= 5120); we use d_model 5120, as OPT-13B.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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


# The GPTConfig fields a preset provides (the model's shape and vocabulary).
_FROM_PRESET = tuple(f.name for f in fields(Preset) if f.name in {g.name for g in fields(GPTConfig)})


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        import difflib

        match = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else f" (known: {', '.join(PRESETS)})"
        raise ValueError(f"unknown model preset {name!r}{hint}")
    return PRESETS[name]


def gpt_config_from(model_cfg, vocab_size: int | None = None) -> GPTConfig:
    """A GPTConfig from a ``hvdllm.config.ModelConfig``: its fields, the preset's shape where 0.

    Every GPTConfig field is copied by name (ModelConfig declares them all, see
    tests/unit/test_model.py), so a new model option needs no edit here. ``vocab_size`` (from
    the data) is used when ``model.vocab_size`` is 0, before the preset's.
    """
    preset = get_preset(model_cfg.preset)
    values = {f.name: getattr(model_cfg, f.name) for f in fields(GPTConfig)}
    values["vocab_size"] = values["vocab_size"] or vocab_size or 0
    for name in _FROM_PRESET:
        values[name] = values[name] or getattr(preset, name)
    return GPTConfig(**values)


def preset_config(name: str, **overrides) -> GPTConfig:
    """A GPTConfig straight from a preset, e.g. ``preset_config("gpt3-175b")``."""
    preset = get_preset(name)
    return GPTConfig(**{**{k: getattr(preset, k) for k in _FROM_PRESET}, **overrides})
