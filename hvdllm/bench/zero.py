"""``hvdllm bench zero``: ``hvdllm train`` on 2 ranks at ``parallel.zero`` 0, 1 and 2, in one run.

Each round runs every stage once (the order alternating between rounds) with the same config,
data and steps; reported per stage: tokens/s inside the step (median over the steps after the
warm-up, then over the rounds) and the optimizer-state and gradient bytes rank 0 holds (from
the metrics, which the logging rank writes). Targets (issue 23): the optimizer state per rank
at most 1/d of zero 0's plus one tensor's (ownership is by whole tensors, the largest of them
standing in for DeepSpeed's bucket), and zero 1's throughput at least 0.9 of zero 0's.
"""

from __future__ import annotations

import statistics

from hvdllm.bench.options import ZeroBenchOptions
from hvdllm.bench.train import alternating, hvdllm_run

RANKS = 2


def _largest_tensor_share(config: str, overrides: list[str]) -> float:
    """The largest parameter tensor's share of the model's parameters (the config's model)."""
    import torch

    from hvdllm.config import load_config
    from hvdllm.data.shards import read_manifest
    from hvdllm.model import GPT, gpt_config_from

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = GPT(gpt_config_from(cfg.model, vocab_size=read_manifest(cfg.data.path)["vocab_size"]))
    sizes = [p.numel() for p in model.parameters()]
    return max(sizes) / sum(sizes)


def bench_zero(options: ZeroBenchOptions, overrides: list[str]) -> dict:
    stages = [int(zero) for zero in options.stages]
    rounds = []
    for index in range(options.rounds):
        rounds.append({zero: hvdllm_run(options.config, [*overrides, f"--parallel.zero={zero}"], options.steps, 1,
                                     np=RANKS) for zero in alternating(stages, index)})
    per_stage = {}
    for zero in stages:
        runs = [measured[zero] for measured in rounds]
        per_stage[str(zero)] = {"tokens_per_s": statistics.median(run["step"] for run in runs),
                                "optimizer_state_bytes": runs[-1]["optimizer_state_bytes"],
                                "gradient_bytes": runs[-1]["gradient_bytes"]}
    result = {"benchmark": "zero", "config": options.config, "overrides": overrides, "steps": options.steps,
              "ranks": RANKS, "threads_per_rank": 1, "stages": per_stage,
              "tokens_per_s_per_round": [{str(z): m[z]["step"] for z in stages} for m in rounds]}
    if 0 in stages:  # the baseline
        plain = per_stage["0"]["optimizer_state_bytes"]
        bound = plain / RANKS + plain * _largest_tensor_share(options.config, overrides)
        result["optimizer_state_bound_bytes"] = int(bound)
        for zero in (z for z in stages if z):
            stage = per_stage[str(zero)]
            stage["optimizer_state_ratio"] = stage["optimizer_state_bytes"] / plain
            stage["within_state_bound"] = stage["optimizer_state_bytes"] <= bound
            stage["throughput_ratio"] = statistics.median(m[zero]["step"] / m[0]["step"] for m in rounds)
    return result


def summary(result: dict) -> str:
    rows = [f"zero {zero}: {stage['tokens_per_s']:,.0f} tokens/s, optimizer state {stage['optimizer_state_bytes']:,} B"
            + (f" (x{stage['optimizer_state_ratio']:.3f} of zero 0's, within 1/d + one tensor: "
               f"{stage['within_state_bound']}), throughput x{stage['throughput_ratio']:.3f} of zero 0's"
               if "throughput_ratio" in stage else "")
            for zero, stage in result["stages"].items()]
    return "\n".join(rows) + "\ntargets: state <= 1/d of zero 0's + one tensor; zero 1 throughput >= 0.9 x zero 0's"
