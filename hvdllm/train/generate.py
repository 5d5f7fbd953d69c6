"""``hvdllm generate``: sample text from a checkpoint (it carries its model shape and tokenizer)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hvdllm.comm import choose_device
from hvdllm.errors import UserError
from hvdllm.model import GPT
from hvdllm.paths import path_kind, require_file
from hvdllm.train.checkpoint import (checkpoint_dir, full_model_state, load_checkpoint, model_config_from_checkpoint,
                                     step_checkpoints)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run folder (or its checkpoints/ folder) its
    best.pt, else its newest step-N.pt."""
    path = Path(path)
    if path_kind(path) != "folder":
        return require_file(path, "checkpoint")
    folder = checkpoint_dir(path) if path_kind(checkpoint_dir(path)) == "folder" else path
    if path_kind(folder / "best.pt") == "file":
        return folder / "best.pt"
    steps = step_checkpoints(folder)
    if not steps:
        raise UserError(f"{path}: no checkpoint in {folder} (neither best.pt nor step-N.pt)")
    return steps[-1]


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, device: str = "cpu") -> str:
    """The prompt and its continuation; says on stderr which checkpoint and step it loaded."""
    torch_device = choose_device(device)  # before loading: a bad device is one line, not a traceback
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    print(f"loaded {path} (step {state['step']})", file=sys.stderr, flush=True)
    model = GPT(model_config_from_checkpoint(state))
    model.load_state_dict(full_model_state(path, state))  # a pipeline run's stages consolidated
    model.to(torch_device).eval()
    tokenizer = Tokenizer.from_str(state["tokenizer_json"])
    prompt_ids = tokenizer.encode(prompt).ids
    # With no prompt the model starts from a document boundary, which is not part of the text.
    ids = prompt_ids or [tokenizer.token_to_id("<|endoftext|>")]
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=torch_device), max_new_tokens, temperature=temperature,
                         top_k=top_k or None, generator=generator)
    shown = out[0].tolist() if prompt_ids else out[0, 1:].tolist()
    return tokenizer.decode(shown, skip_special_tokens=False)
