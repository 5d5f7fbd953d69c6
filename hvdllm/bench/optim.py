"""LAMB step time against torch AdamW (foreach) on the parameter shapes of GPT-2 small."""

from __future__ import annotations

import torch

from hvdllm.bench.common import interleaved_medians
from hvdllm.bench.options import OptimBenchOptions
from hvdllm.model import GPT, preset_config
from hvdllm.optim import Lamb


def gpt_parameters(preset: str, device: torch.device) -> list[torch.nn.Parameter]:
    """Real tensors in the shapes of a preset's parameters, with fixed random gradients."""
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(preset_config(preset)).parameters()]
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return params


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """build_optimizer's rule on bare tensors: matrices decay, vectors do not."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def bench_optimizers(options: OptimBenchOptions) -> dict:
    device = torch.device(options.device)
    adamw_params = gpt_parameters(options.preset, device)
    lamb_params = gpt_parameters(options.preset, device)
    adamw = torch.optim.AdamW(_groups(adamw_params), lr=1e-4, foreach=True)
    lamb = Lamb(_groups(lamb_params), lr=1e-4)
    medians = interleaved_medians({"adamw_foreach": adamw.step, "lamb": lamb.step}, options.repeats, options.warmup)
    n = sum(p.numel() for p in adamw_params)
    return {"benchmark": "optimizer_step", "preset": options.preset, "params": n, "tensors": len(adamw_params),
            "device": options.device, "repeats": options.repeats, "median_s": medians,
            "ratio_lamb_over_adamw": medians["lamb"] / medians["adamw_foreach"], "target_ratio_max": 1.3}
