"""What a config leaves to hvdllm about batches, decided for the launched world before
anything is built: the accumulation a global batch implies, and how many micro-batches a
pipeline splits each batch into. Every rank decides alike, so a bad combination is the same
one-line error everywhere, before any collective."""

from __future__ import annotations

from dataclasses import replace

from hvdllm.config import Config
from hvdllm.errors import UserError
from hvdllm.parallel.grid import build_grid

PIPELINE_DEPTH = 4  # micro-batches per stage the automatic count aims at: bubble (p-1)/(4p+p-1) < 20%


def resolve_batching(cfg: Config, world_size: int) -> Config:
    """``cfg`` with what it leaves to hvdllm decided for this world: the accumulation a global
    batch implies and the automatic count of pipeline micro-batches (checked by every rank
    alike, before any collective)."""
    layout = build_grid(cfg.parallel, world_size)
    cfg = _derive_accumulation(cfg, layout.data)
    if cfg.parallel.micro_batches:
        return cfg
    stages = layout.pipeline if layout.pipeline > 1 else max(1, len(layout.devices))
    return replace(cfg, parallel=replace(cfg.parallel, micro_batches=auto_micro_batches(cfg, stages)))


def auto_micro_batches(cfg: Config, stages: int) -> int:
    """The largest count up to PIPELINE_DEPTH x stages that divides every batch a rank holds
    (each phase's): one for a model in one piece, where micro-batches would only add steps."""
    if stages == 1:
        return 1
    sizes = [cfg.data.batch_size] + [p.batch_size for p in cfg.phases if p.batch_size]
    return max(m for m in range(1, PIPELINE_DEPTH * stages + 1) if all(size % m == 0 for size in sizes))


def _derive_accumulation(cfg: Config, data_ranks: int) -> Config:
    """``cfg`` with ``parallel.accum_steps`` derived from ``data.global_batch_size``, as
    Megatron and DeepSpeed do: ``data.batch_size`` is the micro-batch a rank holds at once and
    never grows by itself (a larger one runs a GPU out of memory), so global = micro-batch x
    data-parallel ranks x accumulation. Under ``parallel.elastic`` the per-rank batch follows
    the workers instead (plan_phases): Horovod's optimizer fixes its accumulation when built."""
    parallel, data = cfg.parallel, cfg.data
    if not data.global_batch_size or parallel.elastic:
        return cfg
    per_pass = data.batch_size * data_ranks
    if data.global_batch_size % per_pass:
        raise UserError(f"data.global_batch_size {data.global_batch_size} is not a multiple of data.batch_size "
                        f"{data.batch_size} x {data_ranks} data-parallel rank(s) = {per_pass}: the accumulation "
                        f"steps must be whole")
    accum = data.global_batch_size // per_pass
    if parallel.accum_steps not in (1, accum):
        raise UserError(f"data.global_batch_size {data.global_batch_size} = data.batch_size {data.batch_size} x "
                        f"{data_ranks} data-parallel rank(s) x {accum} accumulation steps, but parallel.accum_steps "
                        f"is {parallel.accum_steps}: set one of the two")
    return replace(cfg, parallel=replace(parallel, accum_steps=accum))
