"""The GPT model (imports torch only), its presets and initialization strategies."""

from hvdllm.model.gpt import GPT, GPTConfig, language_model_loss, masked_loss_sums
from hvdllm.model.presets import PRESETS, get_preset, gpt_config_from, preset_config

__all__ = ["GPT", "GPTConfig", "PRESETS", "get_preset", "gpt_config_from", "language_model_loss",
           "masked_loss_sums", "preset_config"]
