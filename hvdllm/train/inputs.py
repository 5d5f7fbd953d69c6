"""What a run reads and checks before anything is built: the data's manifest and tokenizer,
the model's config, the phases. Checked identically on every rank before the first
collective, so a bad setting ends every rank with the same one-line error, never a hang."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hvdllm.config import Config
from hvdllm.data.shards import read_manifest, read_tokenizer_json
from hvdllm.errors import UserError
from hvdllm.model import GPTConfig, gpt_config_from
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
    plan = plan_phases(cfg, data_ranks, manifest["seq_len"], gpt_cfg.block_size)
    return RunInputs(manifest, gpt_cfg, read_tokenizer_json(cfg.data.path, manifest), plan)
