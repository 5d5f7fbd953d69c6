"""Hugging Face transformers GPT-2 folders, both ways.

``hvdllm export --format hf`` writes a checkpoint as such a folder (``model.safetensors``,
``config.json``, ``tokenizer.json``, and ``generation_config.json`` and ``tokenizer_config.json``
naming the special tokens), so that ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``
loads it with the same logits and ``AutoTokenizer`` and ``generate`` know end of text;
``train.init_from = "hf:DIR"`` reads one (ours, or a GPT-2 a user has on disk) back into
hvdllm's names and layouts.

hvdllm's GPT with learned positions and biases is GPT-2's architecture: pre-LayerNorm blocks
(eps 1e-5), attention scaled by 1/sqrt(head_dim) over a fused [q|k|v] projection, a tanh-GELU
MLP ("gelu_new"), tied or untied output embeddings. GPT-2 keeps its linear layers as Conv1D,
whose weights are stored (in, out): each Linear weight is transposed. A rotary-position or
bias-free model has no GPT-2 counterpart and is refused with one line; so, on the way in, is a
GPT-2 variant whose config asks for what hvdllm's GPT does not compute. Needs only safetensors
(transformers is for loading the result).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from hvdllm.data.tokenizer import EOS, PAD, eos_id, load_tokenizer
from hvdllm.errors import UserError, first_line
from hvdllm.model import GPT, GPTConfig
from hvdllm.paths import require_replaceable, require_writable_folder

# hvdllm's block names -> GPT-2's, and whether the weight is a Linear's (transposed for Conv1D).
BLOCK_NAMES = {"ln_1": ("ln_1", False), "attn.qkv": ("attn.c_attn", True), "attn.proj": ("attn.c_proj", True),
               "ln_2": ("ln_2", False), "mlp.fc": ("mlp.c_fc", True), "mlp.proj": ("mlp.c_proj", True)}


HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# Written by export so that transformers knows the special tokens' real ids (GPT-2's defaults,
# 50256, lie outside a small vocabulary) and generation stops at end of text; optional on import.
HF_TOKEN_FILES = ("generation_config.json", "tokenizer_config.json")


def special_token_ids(tokenizer_json: str) -> dict[str, int | None]:
    """bos, eos and pad ids of an hvdllm tokenizer: documents end (and so begin) with EOS."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    eos = eos_id(tok)
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tok.token_to_id(PAD)}


def tokenizer_config(cfg: GPTConfig, ids: dict[str, int | None]) -> dict:
    """tokenizer_config.json for ``AutoTokenizer``: the fast tokenizer of tokenizer.json with
    its special tokens named, and the model's context as its maximum length."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
              "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False}
    return config | ({"pad_token": PAD} if ids["pad_token_id"] is not None else {})


def gpt2_config(cfg: GPTConfig, ids: dict[str, int | None] | None = None) -> dict:
    """transformers' GPT2Config, as its config.json, for an hvdllm GPTConfig (with the
    tokenizer's special token ids, when given)."""
    return (ids or {}) | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_weights, "torch_dtype": "float32"}


def gpt2_state_dict(model_state: dict, cfg: GPTConfig) -> dict[str, torch.Tensor]:
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


def export_hf(model_state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer_json: str, source: str | Path,
              out: str | Path, overwrite: bool = False) -> Path:
    """Write a model (``source`` names it in messages) as a transformers folder at ``out``: built
    beside it under a temporary name and renamed into place, so an existing folder is replaced
    whole or not at all."""
    from safetensors.torch import save_file

    out = require_replaceable(out, "--out", overwrite, [Path(source)], is_hf_export, "hvdllm export folder")
    require_writable_folder(out, "--out")
    if cfg.position != "learned" or not cfg.bias:
        raise UserError(f"{source}: export --format hf writes GPT-2, which has learned positions and biases; this "
                        f"model has model.position={cfg.position!r} and model.bias={cfg.bias}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        ids = special_token_ids(tokenizer_json)
        generation = {name: value for name, value in ids.items() if value is not None}
        for name, content in (("config.json", gpt2_config(cfg, ids)), ("generation_config.json", generation),
                              ("tokenizer_config.json", tokenizer_config(cfg, ids))):
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        save_file(gpt2_state_dict(model_state, cfg), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        # safetensors creates its file 0600; the weights are shared like the files open() made.
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():  # moved aside, not deleted, until the new folder has its name
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_hf_export(folder: Path) -> bool:
    """``folder`` holds what export_hf writes and nothing else."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return "config.json" in names and names <= set(HF_FILES + HF_TOKEN_FILES)


# GPT-2 config fields whose value must be this for hvdllm's GPT to compute the same function.
_REQUIRED_GPT2 = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                  "reorder_and_upcast_attn": False}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gpt_config_from_gpt2(config: dict, where: str) -> GPTConfig:
    """hvdllm's GPTConfig for a transformers GPT-2 config.json; UserError naming the first
    field hvdllm cannot follow."""
    if config.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type is {config.get('model_type')!r}; only gpt2 folders can be read")
    for name, value in _REQUIRED_GPT2.items():
        if name in config and config[name] != value:
            raise UserError(f"{where}: {name} is {config[name]!r}; hvdllm's GPT computes {value!r}")
    if config.get("activation_function", "gelu_new") not in _TANH_GELUS:
        raise UserError(f"{where}: activation_function is {config['activation_function']!r}; hvdllm's MLP is "
                        f"the tanh GELU ({', '.join(_TANH_GELUS)})")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise UserError(f"{where}: n_inner is {config['n_inner']}; hvdllm's MLP is 4 x n_embd = {4 * config['n_embd']}")
    return GPTConfig(vocab_size=config["vocab_size"], block_size=config["n_positions"], n_layer=config["n_layer"],
                     n_head=config["n_head"], d_model=config["n_embd"],
                     tie_weights=config.get("tie_word_embeddings", True))


# Buffers older transformers versions saved (the causal mask), and the output embedding a
# tied model may carry as a copy: not weights a GPT-2 of the config lacks.
_NOT_WEIGHTS = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")


def gpt2_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of ``cfg`` has, unprefixed, with its shape (from a model on the
    meta device: no memory)."""
    with torch.device("meta"):
        state = GPT(cfg).state_dict()
    return {name.removeprefix("transformer."): tuple(t.shape) for name, t in gpt2_state_dict(state, cfg).items()}


def check_against_config(theirs: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> None:
    """The weights are the model config.json describes: no tensor it has no place for (a layer
    more would be dropped silently), none missing, each of its shape; else one line naming
    the first that is not."""
    shapes = gpt2_shapes(cfg)
    described = (f"config.json's model (n_layer={cfg.n_layer}, n_embd={cfg.d_model}, n_head={cfg.n_head}, "
                 f"vocab_size={cfg.vocab_size}, n_positions={cfg.block_size})")
    extra = [name for name in theirs if name not in shapes and not _NOT_WEIGHTS.match(name)]
    if extra:
        raise UserError(f"{where}: model.safetensors holds {extra[0]} ({len(extra)} such tensor(s)), which "
                        f"{described} has no place for: config.json and the weights disagree")
    missing = [name for name in shapes if name not in theirs]
    if missing:
        raise UserError(f"{where}: no tensor {missing[0]} ({len(missing)} of the GPT-2 tensors missing)")
    for name, shape in shapes.items():
        if tuple(theirs[name].shape) != shape:
            raise UserError(f"{where}: {name} in model.safetensors has shape {tuple(theirs[name].shape)}, but "
                            f"{described} makes it {shape}: config.json and the weights disagree")


def state_dict_from_gpt2(tensors: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, unprefixed) tensors under hvdllm's names and layouts,
    once they are checked against ``cfg``."""
    theirs = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    check_against_config(theirs, cfg, where)
    wanted = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
              "ln_f.bias": "ln_f.bias"}
    linear = set()
    for i in range(cfg.n_layer):
        for ours, (name, is_linear) in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                wanted[f"blocks.{i}.{ours}.{kind}"] = f"h.{i}.{name}.{kind}"
            if is_linear:
                linear.add(f"blocks.{i}.{ours}.weight")
    if not cfg.tie_weights:
        wanted["lm_head.weight"] = "lm_head.weight"
    state = {ours: theirs[name].t() if ours in linear else theirs[name] for ours, name in wanted.items()}
    if cfg.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def load_hf(folder: str | Path) -> tuple[dict[str, torch.Tensor], GPTConfig, str]:
    """(state dict in hvdllm's names, its GPTConfig, tokenizer.json text) of a GPT-2 folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in HF_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} (a transformers GPT-2 folder has config.json, "
                            f"model.safetensors and tokenizer.json)")
    where = str(folder / "config.json")
    try:
        config = json.loads((folder / "config.json").read_text())
        cfg = gpt_config_from_gpt2(config, where)
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, a missing field, a shape GPTConfig refuses
        raise UserError(f"{where}: not a GPT-2 config the model can be built from ({err})") from None
    load_tokenizer(folder / "tokenizer.json")  # a UserError naming it when it is none
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as err:  # safetensors raises its own SafetensorError, or an OSError
        reason = first_line(err)
        raise UserError(f"{folder / 'model.safetensors'}: not a readable safetensors file ({reason})") from None
    return state_dict_from_gpt2(tensors, cfg, str(folder)), cfg, (folder / "tokenizer.json").read_text()
