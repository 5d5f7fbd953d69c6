"""``hvdllm generate``: sample text from a checkpoint (it carries its model shape and tokenizer)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from hvdllm.model import GPT
from hvdllm.train.checkpoint import load_checkpoint, model_config_from_checkpoint


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, device: str = "cpu") -> str:
    state = load_checkpoint(checkpoint)
    model = GPT(model_config_from_checkpoint(state))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    tokenizer = Tokenizer.from_str(state["tokenizer_json"])
    ids = tokenizer.encode(prompt).ids or [tokenizer.token_to_id("<|endoftext|>")]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                         top_k=top_k or None, generator=generator)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
