"""What a run reads and checks before anything is built: the data's manifest and tokenizer,
the model's config, the phases. Checked identically on every rank before the first
collective, so a bad setting ends every rank with the same one-line error, never a hang."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hvdllm.config import Config
from hvdllm.data.shards import read_manifest, read_tokenizer_json
from hvdllm.errors import UserError
from hvdllm.model import GPTConfig, gpt_config_from
from hvdllm.model.memory import activation_bytes, parameter_count
from hvdllm.train.phases import Phase, plan_phases
from hvdllm.train.warm_start import check_cpu_compiler


@dataclass
class RunInputs:
    manifest: dict
    gpt_cfg: GPTConfig
    tokenizer_json: str
    plan: list[Phase]

    @property
    def shard_seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def has_val(self) -> bool:
        return any(e["split"] == "val" for e in self.manifest["shards"])


def check_inputs(cfg: Config, device: torch.device, data_ranks: int) -> RunInputs:
    """The settings against the device, the data and the model (``data_ranks``: the
    data-parallel degree the phases' batches and lr are planned for)."""
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device (use bf16 on the CPU)")
    if cfg.train.compile and device.type == "cpu":
        check_cpu_compiler()
    manifest = read_manifest(cfg.data.path)
    data_vocab = manifest["vocab_size"]
    if cfg.model.vocab_size and cfg.model.vocab_size < data_vocab:
        raise UserError(f"the data's vocabulary ({data_vocab} in {cfg.data.path}) is larger than "
                        f"model.vocab_size {cfg.model.vocab_size}")
    try:
        gpt_cfg = gpt_config_from(cfg.model, vocab_size=data_vocab)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_model_fits(gpt_cfg, device, training_bytes(gpt_cfg, cfg))
    plan = plan_phases(cfg, data_ranks, manifest["seq_len"], gpt_cfg.block_size)
    return RunInputs(manifest, gpt_cfg, read_tokenizer_json(cfg.data.path, manifest), plan)


def training_bytes(gpt_cfg: GPTConfig, cfg: Config) -> int:
    """A lower bound of the memory one rank trains its part of the model in: fp32 weights and
    gradients over the model-parallel ranks, and the activations of one batch of its stage
    (hvdllm/model/memory.py's formula, in 2-byte units); optimizer state comes on top."""
    parallel = cfg.parallel
    seq_len = cfg.data.seq_len or gpt_cfg.block_size
    activations = activation_bytes(gpt_cfg, cfg.data.batch_size, seq_len, parallel.tensor,
                                   cfg.model.checkpoint_every > 0) // parallel.pipeline
    return 8 * parameter_count(gpt_cfg) // (parallel.pipeline * parallel.tensor) + activations


def check_model_fits(gpt_cfg: GPTConfig, device: torch.device, train_bytes: int = 0) -> None:
    """Refuse, in one line and before anything is built, a model this rank cannot hold (else
    it is built for minutes, memory rising, and dies): every rank builds the whole model in
    fp32 on the host before a strategy cuts it (4 bytes a parameter), and trains its part in
    ``train_bytes`` (training_bytes; 0 when it only builds) on the host or the GPU."""
    params = parameter_count(gpt_cfg)
    shape = f"model.n_layer={gpt_cfg.n_layer}, model.d_model={gpt_cfg.d_model} ({params:,} parameters)"
    host_need = 4 * params + (train_bytes if device.type == "cpu" else 0)
    available = _available_host_bytes()
    if host_need > available:
        raise UserError(f"{shape} needs at least {_gib(host_need)} to build{' and train' if train_bytes else ''}, "
                        f"more than the {_gib(available)} of memory available here: choose a smaller model "
                        f"(`hvdllm plan` sizes one)")
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        if train_bytes > capacity:
            raise UserError(f"{shape} needs at least {_gib(train_bytes)} per rank to train, more than {device}'s "
                            f"{_gib(capacity)}: choose a smaller model, or more parallel.pipeline or parallel.tensor")


def _available_host_bytes() -> int:
    """Memory the host can give without swapping: Linux's MemAvailable, else all of it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
