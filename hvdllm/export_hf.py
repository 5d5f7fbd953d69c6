"""``hvdllm export --format hf``: a checkpoint as a Hugging Face transformers GPT-2 folder
(``model.safetensors``, ``config.json``, ``tokenizer.json``), so that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it with the same logits.

hvdllm's GPT with learned positions and biases is GPT-2's architecture: pre-LayerNorm blocks
(eps 1e-5), attention scaled by 1/sqrt(head_dim) over a fused [q|k|v] projection, a tanh-GELU
MLP ("gelu_new"), tied or untied output embeddings. GPT-2 keeps its linear layers as Conv1D,
whose weights are stored (in, out): each Linear weight is transposed. A rotary-position or
bias-free model has no GPT-2 counterpart and is refused with one line. Needs only safetensors
(transformers is for loading the result).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from hvdllm.errors import UserError
from hvdllm.train.checkpoint import full_model_state, load_checkpoint, model_config_from_checkpoint

# hvdllm's block names -> GPT-2's, and whether the weight is a Linear's (transposed for Conv1D).
BLOCK_NAMES = {"ln_1": ("ln_1", False), "attn.qkv": ("attn.c_attn", True), "attn.proj": ("attn.c_proj", True),
               "ln_2": ("ln_2", False), "mlp.fc": ("mlp.c_fc", True), "mlp.proj": ("mlp.c_proj", True)}


def gpt2_config(cfg) -> dict:
    """transformers' GPT2Config, as its config.json, for an hvdllm GPTConfig."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_weights, "torch_dtype": "float32"}


def gpt2_state_dict(model_state: dict, cfg) -> dict[str, torch.Tensor]:
    """hvdllm's parameter names and layouts -> GPT2LMHeadModel's (contiguous fp32 copies, as
    safetensors stores no shared or strided tensors)."""
    out = {"transformer.wte.weight": model_state["wte.weight"], "transformer.wpe.weight": model_state["wpe.weight"],
           "transformer.ln_f.weight": model_state["ln_f.weight"], "transformer.ln_f.bias": model_state["ln_f.bias"]}
    for i in range(cfg.n_layer):
        for ours, (theirs, linear) in BLOCK_NAMES.items():
            weight = model_state[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if linear else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = model_state[f"blocks.{i}.{ours}.bias"]
    if not cfg.tie_weights:
        out["lm_head.weight"] = model_state["lm_head.weight"]
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in out.items()}


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the checkpoint as a transformers folder at ``out``: built beside it under a
    temporary name and renamed into place, so an existing folder is replaced whole or not at all."""
    from safetensors.torch import save_file

    path, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or add --overwrite to replace it")
    state = load_checkpoint(path)
    cfg = model_config_from_checkpoint(state)
    if cfg.position != "learned" or not cfg.bias:
        raise UserError(f"{path}: export --format hf writes GPT-2, which has learned positions and biases; this "
                        f"model has model.position={cfg.position!r} and model.bias={cfg.bias}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(gpt2_state_dict(full_model_state(path, state), cfg), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(gpt2_config(cfg), indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(state["tokenizer_json"])
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
