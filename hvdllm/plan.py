"""``hvdllm plan``: size a training run before asking for the machines.

Formulas and sources:

- Parameters are counted on the very module the trainer builds, constructed on the meta
  device (no memory). ``non_embedding`` leaves out the token and position tables.
- FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): ``6 N + 12 L H Q T`` with N the
  non-embedding parameters, L layers, H heads, Q head dimension, T sequence length; the
  second term is attention's score and value matmuls. ``train_flops`` = that x tokens.
  GPT-3's own 3.14e23 for 175B at 300B tokens (Brown et al. 2020, appendix D) is ``6 N D``
  without the attention term; it is reported as ``train_flops_6nd`` for comparison.
- Memory per GPU under mixed precision (Rajbhandari et al. 2020, ZeRO, section 3.1): fp16/bf16
  weights 2 B and gradients 2 B per parameter; optimizer state in fp32: AdamW keeps a master
  copy, m and v (12 B), hvdllm's LAMB those and a workspace for the update (16 B); Adafactor
  keeps the master copy (4 B) and, for each n x m matrix, n + m factored second-moment
  entries (4 B each), vectors in full. Parameters are
  split evenly over the model-parallel degree = tensor parallel (at most 8, within a node,
  dividing the heads) x pipeline stages (dividing the layers), as Megatron-LM lays out GPT-3
  (Narayanan et al. 2021); data parallelism (Horovod allreduce) keeps a full replica per group.
  With ``--zero 1`` (``parallel.zero``) each of the d data ranks keeps the optimizer state of
  1/d of its model part's parameters, ``--zero 2`` the gradients too (ZeRO's P_os and
  P_os+g); hvdllm deals whole tensors to the owners, so a rank holds up to one tensor more
  than 1/d: the largest tensor's share of the model-parallel group is added.
- Activations per GPU per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models", eq. 2 with tensor parallel degree t): ``s b h (10 + 24 / t +
  5 a s / (h t))`` bytes; with sequence parallelism (``--sequence-parallel``, eq. 4) the
  LayerNorm and dropout regions are split too: ``s b h (34 / t + 5 a s / (h t))``. With full
  activation checkpointing only each layer's fp16 input is kept, ``2 s b h`` bytes (``/ t``
  with sequence parallelism), plus one layer's worth while recomputing.
  With a 1F1B pipeline schedule the first stage holds p micro-batches of L / p layers, so the
  per-GPU total stays that of L layers whatever the pipeline degree (ibid., section 4.2).
- Wall time: ``train_flops / (gpus x peak FLOP/s x MFU)``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace

import torch

from hvdllm.choices import BALANCE_COSTS, OPTIMIZERS, PIPELINE_SCHEDULES
from hvdllm.model import GPT, get_preset, preset_config
from hvdllm.model.memory import activation_bytes, optimizer_state_bytes
from hvdllm.model.flops import flops_per_token

GIB = 1024**3
MAX_TENSOR_PARALLEL = 8  # tensor parallelism stays inside one node's NVLink domain


@dataclass
class PlanInputs:
    model: str = "gpt3-175b"
    tokens: float = 300e9
    gpus: int = 1024
    gpu_tflops: float = 125.0
    gpu_mem_gb: float = 32.0
    mfu: float = 0.4
    micro_batch: int = 1
    seq_len: int = 0  # 0 = the model's context
    checkpointing: bool = False
    model_parallel: int = 0  # 0 = the smallest degree that fits
    optimizer: str = "adamw"
    pipeline: int = 0  # also show the cut into this many pipeline stages (parallel.pipeline)
    balance: str = "memory"  # what that cut evens out: params | flops | memory
    schedule: str = "1f1b"  # the pipeline schedule whose table is printed (parallel.schedule)
    micro_batches: int = 0  # pipeline micro-batches per batch (parallel.micro_batches); 0 = the stages
    sequence_parallel: bool = False  # parallel.sequence_parallel: activations split along the sequence too
    zero: int = 0  # parallel.zero: 1 shards the optimizer state over the data ranks, 2 the gradients too


def meta_model(name: str) -> GPT:
    """The trainer's GPT for a preset, on the meta device: shapes only, no storage."""
    with torch.device("meta"):
        return GPT(preset_config(name))


def split_model(mp: int, cfg) -> tuple[int, int] | None:
    """Split a model-parallel degree into (tensor, pipeline): the largest tensor degree up to
    one node (8 GPUs) that divides the heads, the rest as pipeline stages dividing the layers."""
    for tp in range(min(mp, MAX_TENSOR_PARALLEL), 0, -1):
        if mp % tp == 0 and cfg.n_head % tp == 0 and cfg.n_layer % (mp // tp) == 0:
            return tp, mp // tp
    return None


def memory_per_gpu(model: GPT, inputs: PlanInputs, seq_len: int, mp: int) -> dict:
    """Bytes per GPU at model-parallel degree ``mp`` (split as :func:`split_model`), for every
    optimizer, with ``inputs.zero`` over the data ranks that leaves."""
    cfg, n_total = model.cfg, model.num_params()
    tp, pp = split_model(mp, cfg)
    data = max(1, inputs.gpus // mp)
    largest = max(p.numel() for p in model.parameters()) / tp  # one tensor's share of a tensor rank

    def sharded(per_param: float, stage: int) -> float:
        """Bytes of ``per_param`` bytes a parameter, kept for 1/data of them at zero >= ``stage``."""
        whole = per_param * n_total / mp
        if inputs.zero < stage or data == 1:
            return whole
        return whole / data + per_param * largest

    weights, grads = 2 * n_total / mp, sharded(2, stage=2)
    optim = {name: sharded(optimizer_state_bytes(model, name) / n_total, stage=1) for name in OPTIMIZERS}
    acts = {"no_checkpointing": activation_bytes(cfg, inputs.micro_batch, seq_len, tp, False, inputs.sequence_parallel),
            "checkpointing": activation_bytes(cfg, inputs.micro_batch, seq_len, tp, True, inputs.sequence_parallel)}
    chosen_acts = acts["checkpointing" if inputs.checkpointing else "no_checkpointing"]
    total = {name: int(weights + grads + optim[name] + chosen_acts) for name in OPTIMIZERS}
    return {"model_parallel": mp, "tensor_parallel": tp, "pipeline_parallel": pp,
            "data_parallel": inputs.gpus // mp, "zero": inputs.zero, "weights": int(weights),
            "gradients": int(grads), "optimizer": {k: int(v) for k, v in optim.items()},
            "activations": acts, "total": total}


def build_plan(inputs: PlanInputs) -> dict:
    preset = get_preset(inputs.model)
    model = meta_model(inputs.model)
    cfg = model.cfg
    seq_len = inputs.seq_len or cfg.block_size
    n_total, n_dense = model.num_params(), model.num_params(non_embedding=True)
    head_dim = cfg.d_model // cfg.n_head
    per_token = flops_per_token(n_dense, cfg.n_layer, cfg.n_head, head_dim, seq_len)

    def memory(mp: int) -> dict:
        return memory_per_gpu(model, inputs, seq_len, mp)

    degrees = [d for d in range(1, inputs.gpus + 1) if inputs.gpus % d == 0 and split_model(d, cfg)]
    if not degrees:
        raise ValueError(f"no model-parallel layout of {inputs.model} fits --gpus {inputs.gpus}")
    limit = inputs.gpu_mem_gb * GIB
    smallest = {name: next((d for d in degrees if memory(d)["total"][name] <= limit), None)
                for name in OPTIMIZERS}
    # The same for the chosen optimizer at each ZeRO stage: the data ranks that sharding frees.
    by_zero = {zero: next((d for d in degrees if memory_per_gpu(model, replace(inputs, zero=zero), seq_len, d)
                           ["total"][inputs.optimizer] <= limit), None) for zero in (0, 1, 2)}
    mp = inputs.model_parallel or smallest[inputs.optimizer] or degrees[-1]
    if inputs.gpus % mp or not split_model(mp, cfg):
        raise ValueError(f"--model-parallel {mp} must divide --gpus and split into tensor parallel "
                         f"<= {MAX_TENSOR_PARALLEL} dividing {cfg.n_head} heads x pipeline stages "
                         f"dividing {cfg.n_layer} layers")

    def fits(degree: int, checkpointing: bool) -> bool:
        m = memory(degree)
        acts = m["activations"]["checkpointing" if checkpointing else "no_checkpointing"]
        return m["weights"] + m["gradients"] + m["optimizer"][inputs.optimizer] + acts <= limit

    chosen = memory(mp)
    train_flops = per_token * inputs.tokens
    seconds = train_flops / (inputs.gpus * inputs.gpu_tflops * 1e12 * inputs.mfu)
    return {
        "model": inputs.model,
        "shape": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "d_model": cfg.d_model,
                  "d_head": head_dim, "context": cfg.block_size, "vocab_size": cfg.vocab_size},
        "params": {"total": n_total, "non_embedding": n_dense, "nominal": preset.nominal_params},
        "tokens": inputs.tokens,
        "seq_len": seq_len,
        "flops_per_token": per_token,
        "train_flops": train_flops,
        "train_flops_6nd": 6 * n_total * inputs.tokens,
        "memory_per_gpu": chosen,
        "assumptions": {"gpu_mem_gb": inputs.gpu_mem_gb, "micro_batch": inputs.micro_batch, "seq_len": seq_len,
                        "precision": "bf16/fp16 weights and gradients, fp32 optimizer state",
                        "checkpointing": inputs.checkpointing, "sequence_parallel": inputs.sequence_parallel,
                        "mfu": inputs.mfu},
        "fit": fit_advice(inputs, cfg, fits, chosen["total"][inputs.optimizer] <= limit),
        "train_overrides": train_overrides(chosen, inputs),
        "tensor_traffic": tensor_parallel_traffic(cfg, inputs, seq_len, chosen["tensor_parallel"],
                                                  chosen["pipeline_parallel"]),
        "gpu_mem_bytes": int(limit),
        "checkpointing": inputs.checkpointing,
        "optimizer": inputs.optimizer,
        "min_model_parallel": smallest,
        "min_model_parallel_by_zero": by_zero,
        "time": {"gpus": inputs.gpus, "gpu_tflops": inputs.gpu_tflops, "mfu": inputs.mfu,
                 "seconds": seconds, "days": seconds / 86400},
        "pipeline_cut": pipeline_cut(inputs, cfg, seq_len) if inputs.pipeline else None,
    }


def pipeline_cut(inputs: PlanInputs, cfg, seq_len: int) -> dict:
    """The cut ``hvdllm train`` makes with ``parallel.pipeline = inputs.pipeline``,
    ``parallel.balance``, ``parallel.schedule`` and ``parallel.micro_batches`` as given, and
    that schedule: its per-rank table, bubble and peak of in-flight micro-batches."""
    from hvdllm.config import ParallelConfig
    from hvdllm.parallel.partition import imbalance
    from hvdllm.parallel.schedules import build_schedule, bubble_fraction, schedule_table, simulate
    from hvdllm.parallel.stage_model import plan_cut

    micro_batches = inputs.micro_batches or inputs.pipeline
    parallel = ParallelConfig(pipeline=inputs.pipeline, balance=inputs.balance, schedule=inputs.schedule,
                              micro_batches=micro_batches)
    blocks, costs = plan_cut(cfg, parallel, inputs.pipeline, seq_len, inputs.micro_batch, inputs.optimizer)
    schedule = build_schedule(inputs.schedule, inputs.pipeline, micro_batches)
    return {"stages": inputs.pipeline, "balance": inputs.balance, "blocks_per_stage": blocks,
            "stage_costs": costs, "imbalance": imbalance(costs),
            "schedule": {"name": inputs.schedule, "micro_batches": micro_batches,
                         "bubble": bubble_fraction(inputs.pipeline, micro_batches),
                         "peak_activations": simulate(schedule).peak_activations,
                         "table": schedule_table(schedule)}}


def train_overrides(layout: dict, inputs: PlanInputs) -> list[str]:
    """The ``hvdllm train`` flags that run a layout of :func:`build_plan`."""
    flags = [f"--parallel.tensor={layout['tensor_parallel']}", f"--parallel.pipeline={layout['pipeline_parallel']}",
             f"--parallel.data={layout['data_parallel']}"]
    if inputs.sequence_parallel and layout["tensor_parallel"] > 1:
        flags.append("--parallel.sequence_parallel=true")
    if inputs.zero and layout["data_parallel"] > 1:
        flags.append(f"--parallel.zero={inputs.zero}")
    return flags


def tensor_parallel_traffic(cfg, inputs: PlanInputs, seq_len: int, tp: int, pp: int) -> dict:
    """Bytes each GPU sends per micro-batch for tensor parallelism: four all-reduces per layer
    (two forward, two backward; Shoeybi et al. 2019) of the bf16 activations (s, b, h), each a
    ring moving 2 (t - 1) / t of its size, over the L / p layers of a stage."""
    if tp == 1:
        return {"per_micro_batch_bytes": 0, "all_reduces_per_micro_batch": 0}
    size = 2 * seq_len * inputs.micro_batch * cfg.d_model
    layers = cfg.n_layer // pp
    return {"per_micro_batch_bytes": int(4 * layers * size * 2 * (tp - 1) / tp),
            "all_reduces_per_micro_batch": 4 * layers}


def fit_advice(inputs: PlanInputs, cfg, fits, fits_now: bool) -> list[str]:
    """What would make the model fit in GPU memory when it does not: activation checkpointing,
    a model-parallel degree (and a GPU count it divides), or more memory per GPU.

    Args:
        fits: (model-parallel degree, checkpointing) -> bool for the chosen optimizer.
    """
    if fits_now:
        return []
    advice = []
    # Degrees that split the model, not only those dividing --gpus: up to one node of tensor
    # parallelism times one stage per layer.
    degrees = [d for d in range(1, MAX_TENSOR_PARALLEL * cfg.n_layer + 1) if split_model(d, cfg)]
    best = None
    for checkpointing in ([inputs.checkpointing] + ([True] if not inputs.checkpointing else [])):
        degree = next((d for d in degrees if fits(d, checkpointing)), None)
        if degree is None or (best is not None and degree >= best):
            continue  # checkpointing is advised only where it needs fewer GPUs per replica
        best = degree
        how = "with activation checkpointing (--checkpointing)" if checkpointing and not inputs.checkpointing \
            else "as it is"
        gpus = -(-inputs.gpus // degree) * degree  # the next multiple of the degree
        where = f"--model-parallel {degree}" + ("" if inputs.gpus % degree == 0
                                                 else f" on a GPU count it divides, e.g. --gpus {gpus}")
        advice.append(f"fits {how} at {where}")
    if not advice:
        advice.append(f"no layout fits in {inputs.gpu_mem_gb:g} GiB per GPU: more memory per GPU, "
                      "a smaller --micro-batch or --seq-len, or another --optimizer")
    return advice


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def format_plan(plan: dict) -> str:
    shape, mem, t = plan["shape"], plan["memory_per_gpu"], plan["time"]
    ckpt = "with" if plan["checkpointing"] else "without"
    zero = f" (zero {mem['zero']}: sharded over the data ranks)" if mem["zero"] else ""
    a = plan["assumptions"]
    rows = [
        f"assumptions        {a['gpu_mem_gb']:g} GiB per GPU, micro-batch {a['micro_batch']} of {a['seq_len']} "
        f"tokens, {a['precision']}, MFU {a['mfu']} (set with --gpu-mem-gb, --micro-batch, --seq-len, --mfu)",
        f"model              {plan['model']}: {shape['n_layer']} layers, d_model {shape['d_model']}, "
        f"{shape['n_head']} heads of {shape['d_head']}, context {shape['context']}, vocab {shape['vocab_size']}",
        f"parameters         {plan['params']['total']:,} total, {plan['params']['non_embedding']:,} non-embedding",
        f"FLOPs per token    {plan['flops_per_token']:.4g}  (6N + 12LHQT at T={plan['seq_len']})",
        f"training FLOPs     {plan['train_flops']:.4g} for {plan['tokens']:.3g} tokens"
        f"  (6ND alone: {plan['train_flops_6nd']:.4g})",
        "",
        f"memory per GPU at model-parallel {mem['model_parallel']} (tensor {mem['tensor_parallel']} x "
        f"pipeline {mem['pipeline_parallel']}) x data-parallel {mem['data_parallel']}{zero}, "
        f"mixed precision, activations {ckpt} checkpointing"
        f"{', split along the sequence' if plan['assumptions']['sequence_parallel'] else ''}:",
        f"  {'':<12}{'weights':>12}{'gradients':>12}{'optimizer':>12}{'activations':>13}{'total':>12}"
        f"{'fits':>6}{'min MP':>8}",
    ]
    acts = mem["activations"]["checkpointing" if plan["checkpointing"] else "no_checkpointing"]
    for name in OPTIMIZERS:
        total = mem["total"][name]
        smallest = plan["min_model_parallel"][name]
        rows.append(f"  {name:<12}{_gib(mem['weights']):>12}{_gib(mem['gradients']):>12}"
                    f"{_gib(mem['optimizer'][name]):>12}{_gib(acts):>13}{_gib(total):>12}"
                    f"{'yes' if total <= plan['gpu_mem_bytes'] else 'no':>6}"
                    f"{smallest if smallest else 'none':>8}")
    rows += [
        f"  activations: {_gib(mem['activations']['no_checkpointing'])} without checkpointing, "
        f"{_gib(mem['activations']['checkpointing'])} with",
    ]
    rows += [f"  {plan['optimizer']} does not fit; it {advice}" for advice in plan["fit"]]
    traffic = plan["tensor_traffic"]
    if traffic["all_reduces_per_micro_batch"]:
        rows += [f"  tensor parallel {mem['tensor_parallel']}: {traffic['all_reduces_per_micro_batch']} all-reduces "
                 f"and {_gib(traffic['per_micro_batch_bytes'])} sent per GPU per micro-batch (activations, bf16), "
                 f"latency-bound: keep the tensor group within a node"]
    by_zero = plan["min_model_parallel_by_zero"]
    rows += [f"  {plan['optimizer']} with its state sharded over the data ranks (--zero): the smallest "
             "model-parallel degree that fits is " + ", ".join(f"{d or 'none'} at zero {z}" for z, d in by_zero.items())]
    rows += ["  hvdllm train runs this layout with " + " ".join(plan["train_overrides"])]
    rows += [
        "",
        f"time               {t['days']:,.1f} days on {t['gpus']} GPUs at {t['gpu_tflops']} TFLOP/s, "
        f"MFU {t['mfu']}",
    ]
    cut = plan["pipeline_cut"]
    if cut:
        unit = {"params": "parameters", "flops": "FLOPs per token", "memory": "bytes"}[cut["balance"]]
        rows += ["", f"pipeline cut       {cut['stages']} stages balanced by {cut['balance']} "
                     f"(parallel.stage_layers = {cut['blocks_per_stage']}), imbalance {cut['imbalance']:.3f} "
                     f"(largest stage / mean)"]
        rows += [f"  stage {i}: {blocks} blocks{' + embedding' if i == 0 else ''}"
                 f"{' + head' if i == cut['stages'] - 1 else ''}, {cost:.4g} {unit}"
                 for i, (blocks, cost) in enumerate(zip(cut["blocks_per_stage"], cut["stage_costs"]))]
        sched = cut["schedule"]
        rows += ["", f"schedule           {sched['name']}, {sched['micro_batches']} micro-batches: bubble "
                     f"{sched['bubble']:.3f} ((p - 1) / (m + p - 1)), micro-batches held at the peak per rank "
                     f"{sched['peak_activations']}",
                 "  (iFj: forward of micro-batch j on stage i, iBj its backward; one slot each, . idle)"]
        rows += [f"  {row}" for row in sched["table"]]
    return "\n".join(rows)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PlanInputs()
    parser.add_argument("--model", default=defaults.model, help="model preset, e.g. gpt3-175b")
    parser.add_argument("--tokens", type=float, default=defaults.tokens, help="training tokens")
    parser.add_argument("--gpus", type=int, default=defaults.gpus)
    parser.add_argument("--gpu-tflops", type=float, default=defaults.gpu_tflops, help="peak per GPU")
    parser.add_argument("--gpu-mem-gb", type=float, default=defaults.gpu_mem_gb, help="memory per GPU, GiB")
    parser.add_argument("--mfu", type=float, default=defaults.mfu, help="model FLOPs utilization")
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    parser.add_argument("--seq-len", type=int, default=0, help="default: the model's context")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="split the activations tensor parallelism replicates along the sequence too")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2), default=defaults.zero,
                        help="parallel.zero: shard the optimizer state (1), and the gradients (2), over the data ranks")
    parser.add_argument("--model-parallel", type=int, default=0, help="default: the smallest that fits")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--pipeline", type=int, default=0, help="also print the cut into this many pipeline stages")
    parser.add_argument("--balance", choices=BALANCE_COSTS, default=defaults.balance,
                        help="what the pipeline cut evens out across stages")
    parser.add_argument("--schedule", choices=PIPELINE_SCHEDULES, default=defaults.schedule,
                        help="with --pipeline: the schedule printed as a per-rank table")
    parser.add_argument("--micro-batches", type=int, default=0,
                        help="with --pipeline: micro-batches per batch (default: the stages)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    """PlanInputs from parsed flags; a value out of range is a ValueError naming its flag."""
    inputs = PlanInputs(**{name: getattr(args, name) for name in PlanInputs.__dataclass_fields__})
    checks = {"--tokens": inputs.tokens > 0, "--gpus": inputs.gpus >= 1, "--gpu-tflops": inputs.gpu_tflops > 0,
              "--gpu-mem-gb": inputs.gpu_mem_gb > 0, "--mfu": 0 < inputs.mfu <= 1,
              "--micro-batch": inputs.micro_batch >= 1, "--seq-len": inputs.seq_len >= 0,
              "--model-parallel": inputs.model_parallel >= 0, "--pipeline": inputs.pipeline >= 0,
              "--micro-batches": 0 <= inputs.micro_batches < 16383}
    for flag, ok in checks.items():
        value = getattr(inputs, flag[2:].replace("-", "_"))
        if not ok or not math.isfinite(value):
            raise ValueError(f"{flag} is out of range: {value}")
    return inputs


def run_plan(args: argparse.Namespace) -> int:
    plan = build_plan(inputs_from_args(args))
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
