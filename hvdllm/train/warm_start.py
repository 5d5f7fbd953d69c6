"""A run's initial model: seeded, and with ``train.init_from`` (an hvdllm checkpoint or
``hf:DIR``) started from trained weights, grown when the run's model is larger. Only the
weights are taken. docs/design/training-loop.md says more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from hvdllm.config import Config
from hvdllm.data.tokenizer import same_tokenizer
from hvdllm.errors import UserError, first_line
from hvdllm.model import GPT, GPTConfig
from hvdllm.model.growth import grow_state_dict, growth_problem
from hvdllm.paths import require_replaceable, require_writable_folder

HF_PREFIX = "hf:"
_SHAPE = ("n_layer", "n_head", "d_model", "block_size", "vocab_size", "position", "bias", "tie_weights")


class Source(NamedTuple):
    state: dict[str, torch.Tensor]  # hvdllm's parameter names
    cfg: GPTConfig
    tokenizer_json: str


def read_source(spec: str) -> Source:
    """The weights, model config and tokenizer of an hvdllm checkpoint or ``hf:DIR``."""
    if spec.startswith(HF_PREFIX):
        from hvdllm.hf_gpt2 import load_hf

        return Source(*load_hf(spec[len(HF_PREFIX):]))
    from hvdllm.train.checkpoint import checkpoint_weights
    from hvdllm.train.generate import resolve_checkpoint

    if (Path(spec) / "config.json").is_file():
        raise UserError(f"{spec} is a transformers folder: name it hf:{spec}")
    return Source(*checkpoint_weights(resolve_checkpoint(spec)))


def describe(cfg: GPTConfig) -> str:
    """The fields that make a model's shape, as name=value."""
    return ", ".join(f"{name}={getattr(cfg, name)}" for name in _SHAPE)


def grow_into(spec: str, source: Source, fresh: GPT, seed: int) -> dict[str, torch.Tensor]:
    """The source's weights as a state dict of ``fresh``'s config (grown when larger; rows of
    positions the source never had are ``fresh``'s); a UserError in one line when they cannot
    become it."""
    target = fresh.cfg
    problem = growth_problem(source.cfg, target)
    if problem:
        raise UserError(f"init from {spec}: {problem}; its model is {describe(source.cfg)}, this one {describe(target)}")
    return grow_state_dict(source.state, source.cfg, target, fresh.state_dict(), torch.Generator().manual_seed(seed))


def initial_model(cfg: Config, gpt_cfg: GPTConfig, tokenizer_json: str, say: Callable[[str], None] | None = None,
                  warm_start: bool = True) -> GPT:
    """The whole model every layout starts from (before a strategy cuts it): seeded with
    ``train.seed``, then loaded from ``train.init_from`` if set and ``warm_start`` (False when
    a checkpoint is resumed: its weights win, and the source need not be there any more).
    ``tokenizer_json`` is the data's: a source trained on other token ids is refused."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(gpt_cfg)
    spec = cfg.train.init_from
    if not spec or not warm_start:
        return model
    source = read_source(spec)
    if not same_tokenizer(source.tokenizer_json, tokenizer_json):
        raise UserError(f"train.init_from={spec}: its tokenizer is not the one {cfg.data.path} was made with, so "
                        f"token ids would mean other text (prepare the data with --tokenizer and its tokenizer.json)")
    try:
        model.load_state_dict(grow_into(spec, source, model, cfg.train.seed))
    except RuntimeError as err:  # a tensor whose shape its own config contradicts
        raise UserError(f"train.init_from={spec}: its tensors do not fit its model config "
                        f"({str(err).strip().splitlines()[-1].strip()})") from None
    if say is not None:
        grown = "" if describe(source.cfg) == describe(gpt_cfg) else f", grown from {describe(source.cfg)}"
        say(f"initial weights from {spec}{grown}")
    return model


def check_cpu_compiler() -> None:
    """``train.compile`` on the CPU: Inductor's C++ compiler is there, found as Inductor finds
    it ($CXX, else g++), or one line says what is missing."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # Inductor raises its own InvalidCxxCompiler (a RuntimeError)
        reason = first_line(err)
        raise UserError(f"train.compile on the CPU needs the C++ compiler Inductor uses ($CXX, else g++): "
                        f"{reason}; install one, or set train.compile=false") from None


def grow_checkpoint(spec: str, cfg: Config, out: Path, overwrite: bool) -> tuple[GPTConfig, GPTConfig]:
    """``hvdllm grow``: write the source grown into the config's model as a checkpoint at
    ``out`` (weights only, step 0), for ``train.init_from``; (source, grown) configs."""
    from hvdllm.config import config_to_toml
    from hvdllm.model import gpt_config_from
    from hvdllm.train.checkpoint import write_state
    from hvdllm.train.inputs import check_model_fits  # it imports this module

    read_from = Path(spec.removeprefix(HF_PREFIX))
    require_replaceable(out, "--out", overwrite, [read_from], is_grown_checkpoint, "hvdllm grow checkpoint")
    require_writable_folder(out.parent, f"--out {out}: its folder")  # not the temporary name's error
    source = read_source(spec)
    try:
        target = gpt_config_from(cfg.model, vocab_size=source.cfg.vocab_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_model_fits(target, torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)
    state = grow_into(spec, source, GPT(target), cfg.train.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_state({"model": state, "optimizer": {}, "step": 0, "config_toml": config_to_toml(cfg),
                 "model_config": vars(target), "tokenizer_json": source.tokenizer_json}, out)
    return source.cfg, target


def is_grown_checkpoint(path: Path) -> bool:
    """``path`` looks like what grow_checkpoint writes: a checkpoint file with its checksum
    beside it, outside a run's checkpoints/ folder (whose files are a run's, never grow's)."""
    from hvdllm.train.checkpoint import checksum_path

    return path.is_file() and checksum_path(path).is_file() and path.parent.name != "checkpoints"
