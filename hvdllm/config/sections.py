"""The sections of a config: one dataclass per concern, each field with a default and a
comment, validated in ``__post_init__`` with one line naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from hvdllm.choices import (BALANCE_COSTS, INIT_STRATEGIES, OPTIMIZERS, PARALLEL_STRATEGIES, PIPELINE_SCHEDULES,
                            POSITIONS, SCALE_RULES, SCHEDULES, SPACE_DISTRIBUTIONS)
from hvdllm.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a config file or override; the message is one line naming the key."""


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {why}")


def _one_of(value: str, name: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, name, f"must be one of {', '.join(choices)}; got {value!r}")


def _at_least(minimum: int, section_obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(section_obj, name)
        _require(value >= minimum, f"{section}.{name}", f"must be >= {minimum}, got {value}")


def _finite_floats(section_obj: Any, section: str) -> None:
    """No float field takes inf or nan: TOML and float() accept them, but a timeout, a rate or
    a bound of inf passes every ">= 0" check and overflows where it is used."""
    for f in fields(section_obj):
        value = getattr(section_obj, f.name)
        _require(not isinstance(value, float) or math.isfinite(value), f"{section}.{f.name}",
                 f"must be a finite number, got {value}")


@dataclass
class DataConfig:
    path: str = "data/demo"  # folder with manifest.json and the HDF5 shards
    batch_size: int = 8  # samples per rank per micro-batch (never changed by hvdllm)
    global_batch_size: int = 0  # if set: samples per optimizer step over all ranks; then
    #   parallel.accum_steps = global_batch_size / (batch_size * data-parallel ranks)
    #   (under parallel.elastic: batch_size = global_batch_size / (workers * accum_steps))
    seq_len: int = 0  # tokens per sample fed to the model; 0 = the shards' seq_len
    seed: int = 1234  # seed of the global per-epoch shuffle
    shuffle: bool = True
    prefetch: int = 4  # batches queued by the background reader; 0 = read in the training thread
    random_offset: bool = False  # augmentation: start each sample at a random offset
    verify_checksums: bool = False  # sha256 of every shard against the manifest on open

    def __post_init__(self) -> None:
        _at_least(1, self, "data", "batch_size")
        _at_least(0, self, "data", "global_batch_size", "seq_len", "prefetch")


@dataclass
class ModelConfig:
    preset: str = "gpt-mini"  # a name from hvdllm.model.presets; fields below override it
    n_layer: int = 0  # 0 = the preset's value
    n_head: int = 0
    d_model: int = 0
    block_size: int = 0  # maximum context length
    vocab_size: int = 0  # 0 = the data's vocabulary size
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True  # share the token embedding with the output projection
    position: str = "learned"  # learned | rope
    init: str = "gpt2"  # gpt2 | xavier | kaiming | small
    checkpoint_every: int = 0  # activation checkpointing: 0 off, k = every k-th block

    def __post_init__(self) -> None:
        _finite_floats(self, "model")
        _at_least(0, self, "model", "n_layer", "n_head", "d_model", "block_size", "vocab_size", "checkpoint_every")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _one_of(self.position, "model.position", POSITIONS)
        _one_of(self.init, "model.init", INIT_STRATEGIES)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lamb | adafactor
    lr: float = 6e-4  # base learning rate for one rank (see schedule.scale_rule)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # apply weight decay to embedding tables too
    trust_clip: float = 0.0  # LAMB: clamp the trust ratio to this value; 0 = no clamp
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    # AdamW's kernel: on = fused (one kernel for every parameter), off = foreach (one per op over
    # all tensors); auto = fused on CUDA, foreach on the CPU (where fused gains little).
    fused: str = "auto"

    def __post_init__(self) -> None:
        _finite_floats(self, "optim")
        _one_of(self.name, "optim.name", OPTIMIZERS)
        _one_of(self.fused, "optim.fused", ("auto", "on", "off"))
        _require(self.fused != "on" or self.name == "adamw", "optim.fused",
                 f"=on is AdamW's kernel; optim.name is {self.name!r}")
        _require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _at_least(0, self, "optim", "weight_decay", "trust_clip", "grad_clip")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | linear | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # floor of cosine / linear / wsd decay, as a fraction of the peak
    milestones: list[int] = field(default_factory=list)  # step decay: steps where lr *= gamma
    gamma: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay
    scale_rule: str = "none"  # scale the base lr with data-parallel ranks: none | linear | sqrt
    plateau: bool = False  # also multiply lr by plateau_factor when val loss stops improving
    plateau_factor: float = 0.5
    plateau_patience: int = 2  # evaluations without improvement before a reduction

    def __post_init__(self) -> None:
        _finite_floats(self, "schedule")
        _one_of(self.name, "schedule.name", SCHEDULES)
        _one_of(self.scale_rule, "schedule.scale_rule", SCALE_RULES)
        _at_least(0, self, "schedule", "warmup_steps")
        _require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio",
                 f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 < self.gamma <= 1, "schedule.gamma", f"must be in (0, 1], got {self.gamma}")
        _require(0 < self.decay_fraction <= 1, "schedule.decay_fraction",
                 f"must be in (0, 1], got {self.decay_fraction}")
        _require(0 < self.plateau_factor < 1, "schedule.plateau_factor",
                 f"must be in (0, 1), got {self.plateau_factor}")
        _require(list(self.milestones) == sorted(self.milestones), "schedule.milestones",
                 f"must be increasing, got {self.milestones}")


@dataclass
class ParallelConfig:
    # The grid (hvdllm/parallel/grid.py): data x pipeline x tensor + servers = the launched ranks.
    strategy: str = "sync"  # how updates travel: sync (Horovod ring-allreduce every step) | async | local-sgd
    data: int = 0  # data-parallel degree; 0 = the launched ranks left after pipeline and servers
    pipeline: int = 1  # pipeline stages across ranks
    tensor: int = 1  # ranks splitting each layer (tensor parallelism)
    # How the tensor group's all-reduces travel: horovod (its process set) | mpi4py (its MPI
    # communicator); `hvdllm bench tensor` measures both (README: why horovod is the default).
    tensor_backend: str = "horovod"
    # Cut the residual stream between split regions along the sequence (LayerNorms and dropout see T / t tokens).
    sequence_parallel: bool = False
    # ZeRO over the data axis (hvdllm/parallel/zero.py): 1 shards the optimizer state, 2 the gradients too.
    zero: int = 0
    zero_bucket_mb: float = 25.0  # zero 2 reduce-scatters the gradients in buckets of this size, overlapping backward
    servers: int = 0  # parameter-server ranks (for asynchronous updates)
    devices: list[str] = field(default_factory=list)  # devices driven by each rank; [] = its own
    stage_layers: list[int] = field(default_factory=list)  # blocks per stage; [] = cut by `balance`
    balance: str = "params"  # what the cut evens out across stages: params | flops | memory
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b
    # Pipeline micro-batches per batch (must divide data.batch_size); 0 = the largest divisor of
    # data.batch_size up to 4 x stages (parallel/batching.py); 1 with no stages.
    micro_batches: int = 0
    op: str = "average"  # average | adasum
    compression: str = "none"  # none | fp16 (gradients on the wire)
    accum_steps: int = 1  # micro-batches per optimizer step (backward_passes_per_step)
    fusion_threshold_mb: float = -1.0  # HOROVOD_FUSION_THRESHOLD; -1 = Horovod's (128 MB) or the env's
    cycle_time_ms: float = -1.0  # HOROVOD_CYCLE_TIME; -1 = Horovod's (1 ms) or the env's
    hierarchical_allreduce: bool = False  # HOROVOD_HIERARCHICAL_ALLREDUCE
    # Open MPI's mpi_yield_when_idle: its progress loop yields the core while it waits.
    # Horovod's background thread otherwise spins against the training thread; on a node
    # with no spare cores that halves the step rate (benchmarks/results/scaling.json).
    mpi_yield_when_idle: bool = True
    timeline: str = ""  # HOROVOD_TIMELINE file; empty = off
    # Horovod elastic (hvdllm/train/elastic.py): workers may come and go under horovodrun's elastic mode.
    elastic: bool = False
    elastic_commit_every: int = 10  # steps between in-memory commits (a failure repeats the steps since)
    # local-sgd (hvdllm/parallel/local_sgd.py): H inner steps, then averaged deltas and an outer step.
    local_steps: int = 8  # H: inner optimizer steps between two averagings
    outer_lr: float = 0.7  # the outer SGD's learning rate (DiLoCo)
    outer_momentum: float = 0.9  # the outer SGD's Nesterov momentum; 0 = plain SGD
    # async (hvdllm/parallel/param_server.py): parameter servers, bounded staleness (SSP).
    max_staleness: int = 0  # s: a worker's parameters never miss more than s clocks (steps) of updates; 0 = sync
    staleness_lr: bool = False  # divide a push's lr by its staleness (Zhang et al. 2016)
    # s = 0: server 0 splits each clock's global batch among the workers by their measured
    # speed (LB-BSP), so a slow worker computes fewer of its samples; the update stays sync's.
    load_balance: bool = False
    # A worker the servers hear nothing from (heartbeats) for this long is dead; above a push's transfer time.
    worker_timeout_s: float = 30.0
    # Go on without a dead worker instead of ending the job (launch with mpirun --enable-recovery).
    continue_without_dead: bool = False

    def __post_init__(self) -> None:
        _finite_floats(self, "parallel")
        _one_of(self.strategy, "parallel.strategy", PARALLEL_STRATEGIES)
        _one_of(self.op, "parallel.op", ("average", "adasum"))
        _one_of(self.compression, "parallel.compression", ("none", "fp16"))
        _one_of(self.balance, "parallel.balance", BALANCE_COSTS)
        _one_of(self.schedule, "parallel.schedule", PIPELINE_SCHEDULES)
        _one_of(self.tensor_backend, "parallel.tensor_backend", ("horovod", "mpi4py"))
        _at_least(1, self, "parallel", "accum_steps", "pipeline", "tensor")
        _at_least(0, self, "parallel", "micro_batches")
        # Two MPI tags each, below 32767 (the tied embedding's gradient) and MPI's guaranteed bound.
        _require(self.micro_batches < 16383, "parallel.micro_batches", f"must be below 16383, got {self.micro_batches}")
        _at_least(0, self, "parallel", "data", "servers", "max_staleness", "outer_momentum")
        _at_least(1, self, "parallel", "local_steps", "elastic_commit_every")
        _require(self.zero in (0, 1, 2), "parallel.zero", f"must be 0, 1 or 2, got {self.zero}")
        _require(self.zero_bucket_mb > 0, "parallel.zero_bucket_mb", f"must be > 0, got {self.zero_bucket_mb}")
        _require(not self.zero or (self.strategy == "sync" and self.op == "average" and not self.elastic),
                 "parallel.zero", "shards the optimizer state of a synchronous data group: it needs "
                 "parallel.strategy=sync, parallel.op=average and parallel.elastic=false")
        _require(not self.load_balance or self.strategy == "async", "parallel.load_balance",
                 "needs parallel.strategy=async (server 0 splits the global batches)")
        _require(self.outer_lr > 0, "parallel.outer_lr", f"must be > 0, got {self.outer_lr}")
        _require(self.worker_timeout_s > 0, "parallel.worker_timeout_s", f"must be > 0, got {self.worker_timeout_s}")
        _require(self.outer_momentum < 1, "parallel.outer_momentum", f"must be < 1, got {self.outer_momentum}")
        for i, blocks in enumerate(self.stage_layers):
            _require(blocks >= 1, f"parallel.stage_layers[{i}]", f"must be >= 1 block, got {blocks}")
        _require(self.fusion_threshold_mb >= 0 or self.fusion_threshold_mb == -1, "parallel.fusion_threshold_mb",
                 f"must be >= 0 (or -1), got {self.fusion_threshold_mb}")
        _require(self.cycle_time_ms > 0 or self.cycle_time_ms == -1, "parallel.cycle_time_ms",
                 f"must be > 0 (or -1), got {self.cycle_time_ms}")


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps (when no [[phases]] are given)
    seed: int = 1337
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each transformer block (Inductor); the first step pays the compilation
    threads: int = 0  # torch threads per rank; 0 = cores / ranks on the node
    eval_every: int = 50  # steps between evaluations; 0 = only at the end
    eval_batches: int = 8  # batches per rank per evaluation
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    peak_flops: float = 0.0  # per-rank peak FLOP/s for MFU; 0 = GPU data sheet, or a measured CPU matmul
    # Abort the job when a rank completes no step for this long (a stopped or hung rank); sets
    stall_timeout_s: float = 600.0  # Horovod's stall warning (half of it), shutdown (2x); 0 = off
    run_dir: str = "runs/default"
    # Start from trained weights: an hvdllm checkpoint (.pt or run folder) or hf:DIR (a transformers
    # GPT-2 folder); a smaller source is grown into this model, function-preserving. "" = random init.
    init_from: str = ""
    # Fault injection (benchmarks, tests): this rank sleeps (factor - 1) x its own step time per step.
    slowdown_rank: int = -1  # the rank to slow; -1 = none
    slowdown_factor: float = 1.0  # its step takes this many times as long

    def __post_init__(self) -> None:
        _finite_floats(self, "train")
        _one_of(self.precision, "train.precision", ("fp32", "bf16", "fp16"))
        _require(self.slowdown_factor >= 1, "train.slowdown_factor", f"must be >= 1, got {self.slowdown_factor}")
        _one_of(self.device, "train.device", ("auto", "cpu", "cuda"))
        _at_least(1, self, "train", "steps", "eval_batches", "max_bad_steps")
        _at_least(0, self, "train", "threads", "eval_every", "peak_flops", "stall_timeout_s")
        # "" would make the current folder the run folder, checkpoints and metrics among the user's files.
        _require(bool(self.run_dir.strip()), "train.run_dir", "must name a folder, got an empty string")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3
    keep_best: bool = True  # also keep the checkpoint with the best val loss
    resume: str = ""  # "" = start fresh, "auto" = latest good checkpoint in run_dir, or a path

    def __post_init__(self) -> None:
        _at_least(0, self, "checkpoint", "every")
        _at_least(1, self, "checkpoint", "keep_last")


@dataclass
class LogConfig:
    every: int = 10  # steps between metrics lines
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on a terminal; else (or off) one line per logged step
    plot: bool = True  # PNG of loss and throughput at the end

    def __post_init__(self) -> None:
        _require(self.every >= 1, "log.every", f"must be >= 1, got {self.every}")


@dataclass
class PhaseConfig:
    """One phase of a multi-phase run; 0 or empty fields keep the run's own value."""

    steps: int = 0
    batch_size: int = 0
    seq_len: int = 0
    lr: float = 0.0
    schedule: str = ""
    warmup_steps: int = -1

    def __post_init__(self) -> None:
        _finite_floats(self, "phases")
        _at_least(1, self, "phases", "steps")
        _at_least(0, self, "phases", "batch_size", "seq_len", "lr")
        if self.schedule:
            _one_of(self.schedule, "phases.schedule", SCHEDULES)


TUNE_SAMPLERS = ("tpe", "random", "grid")


@dataclass
class TuneConfig:
    """``hvdllm tune`` (hvdllm/tune/): a study of training trials; ``hvdllm train`` ignores it."""

    trials: int = 20  # finished trials the study should hold in all (a re-run adds only the missing ones)
    ranks: int = 1  # MPI ranks per trial (mpirun -np)
    sampler: str = "tpe"  # tpe | random | grid (Optuna's samplers)
    seed: int = 0  # the sampler's seed
    prune: bool = True  # stop a trial whose validation loss is worse than the median of finished ones
    prune_startup_trials: int = 3  # completed trials before any trial is pruned
    prune_warmup_steps: int = 0  # training steps a trial runs before it can be pruned
    study: str = ""  # the study's folder (study.db, trial-NNNN/, trials.csv, tune.png); "" = <train.run_dir>/tune
    # config key -> distribution, checked by `hvdllm tune` (hvdllm/tune/space.py), e.g.
    # "optim.lr" = { log = [1e-4, 1e-2] }, "optim.weight_decay" = [0.0, 0.1]
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of(self.sampler, "tune.sampler", TUNE_SAMPLERS)
        _at_least(1, self, "tune", "trials", "ranks")
        _at_least(0, self, "tune", "prune_startup_trials", "prune_warmup_steps")
        self.space = _flatten_space(self.space)


def _flatten_space(space: dict[str, Any]) -> dict[str, Any]:
    """``optim.lr = {...}`` unquoted in TOML (or a [tune.space.optim] table) nests as
    {"optim": {"lr": {...}}}: flatten it to the quoted form {"optim.lr": {...}}."""
    flat = {}
    for key, value in space.items():
        nested = "." not in key and isinstance(value, dict) and not set(value) & {*SPACE_DISTRIBUTIONS, "step"}
        flat.update({f"{key}.{inner}": dist for inner, dist in value.items()} if nested else {key: value})
    return flat


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
