"""The options of each ``hvdllm bench`` sub-command: one dataclass per benchmark, the only
place their defaults live.

Every field is a flag of its sub-command (``batch_size`` -> ``--batch-size``) whose default
and help come from the field, so ``--help``, the CLI and the benchmark functions cannot
drift apart. Each check raises :class:`UserError` with one line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hvdllm.bench import comm_report
from hvdllm.choices import PIPELINE_SCHEDULES
from hvdllm.errors import UserError

COMM_BACKENDS = ("mpi4py", "torch-gloo", "horovod-mpi", "horovod-gloo", "horovod-nccl", "torch-nccl")
COMM_DTYPES = ("fp32", "fp16", "bf16")
_ROUNDS_HELP = "paired rounds of hvdllm and its baseline; the median ratio is reported"
# The overhead benchmark's speed switches: the train overrides each one adds.
SPEED_SWITCHES = {"compile": ("--train.compile=true",), "fused": ("--optim.fused=on",)}


def _flag(default: Any, text: str) -> Any:
    """A field that is also a flag; ``text`` is its line in ``--help``."""
    return field(default=default, metadata={"help": text})


def _check(ok: bool, flag: str, why: str) -> None:
    if not ok:
        raise UserError(f"{flag} {why}")


def _known_preset(name: str, flag: str) -> None:
    from hvdllm.model.presets import get_preset

    try:
        get_preset(name)
    except ValueError as err:  # unknown model preset 'x' (did you mean ...)
        raise UserError(f"{flag}: {err}") from None


def _all_known(values: tuple[str, ...], flag: str, known: tuple[str, ...], what: str) -> None:
    for value in values:
        _check(value in known, flag, f"has unknown {what} {value!r} (known: {', '.join(known)})")


@dataclass
class BenchOptions:
    """What every benchmark takes."""

    summary: ClassVar[str] = ""  # the sub-command's line in ``hvdllm bench --help``
    # Whether it reads a training config, and so takes --section.key=value overrides of it.
    takes_training_config: ClassVar[bool] = False

    json: str = _flag("", "write the result here as JSON")

    @property
    def plot_path(self) -> str:
        """Where a benchmark with a ``plot`` flag draws: there, else beside --json (else nowhere)."""
        plot = getattr(self, "plot", "")
        return plot or (self.json.rsplit(".", 1)[0] + ".png" if self.json else "")


@dataclass
class CommBenchOptions(BenchOptions):
    summary: ClassVar[str] = ("Horovod (MPI, Gloo, NCCL) collectives against mpi4py and torch.distributed; "
                              "launch with mpirun -np N")

    sizes: str = _flag("8B:64MB", "message sizes MIN:MAX, e.g. 8B:256MB")
    factor: int = _flag(4, "size multiplier between steps of the sweep")
    dtypes: tuple[str, ...] = _flag(("fp32",), f"comma list of {', '.join(COMM_DTYPES)}")
    ops: tuple[str, ...] = _flag(comm_report.OPS, "comma list of operations")
    warmup: int = _flag(5, "warm-up iterations per size")
    iters: int = _flag(20, "timed iterations per size (a quarter of them, at least 5, from 1 MB up)")
    backends: tuple[str, ...] = _flag((), f"comma list of {', '.join(COMM_BACKENDS)}; empty: every one available")
    plot: str = _flag("", "PNG of busbw against size; empty: next to --json")
    no_plot: bool = _flag(False, "draw no plot")
    tune_preset: str = _flag("", "also sweep Horovod cycle time x fusion threshold on this model preset's "
                                 "gradients, e.g. gpt-mini")
    tune_repeats: int = _flag(10, "timed repeats per tuning setting")

    def __post_init__(self) -> None:
        comm_report.parse_sizes(self.sizes, self.factor)  # raises naming --sizes or --factor
        _all_known(self.dtypes, "--dtypes", COMM_DTYPES, "dtype")
        _all_known(self.ops, "--ops", comm_report.OPS, "op")
        _all_known(self.backends, "--backends", COMM_BACKENDS, "backend")
        _check(self.warmup >= 0, "--warmup", f"must be >= 0, got {self.warmup}")
        _check(self.iters >= 1, "--iters", f"must be >= 1, got {self.iters}")
        _check(self.tune_repeats >= 1, "--tune-repeats", f"must be >= 1, got {self.tune_repeats}")
        if self.tune_preset:
            _known_preset(self.tune_preset, "--tune-preset")

    @property
    def message_sizes(self) -> list[int]:
        return comm_report.parse_sizes(self.sizes, self.factor)

    @property
    def plot_path(self) -> str:
        return "" if self.no_plot else super().plot_path


@dataclass
class OptimBenchOptions(BenchOptions):
    summary: ClassVar[str] = "LAMB step time against torch AdamW (foreach) on a model preset's parameter shapes"

    preset: str = _flag("gpt2-small", "parameter shapes of this model preset")
    repeats: int = _flag(15, "timed steps of each optimizer")
    warmup: int = _flag(3, "untimed steps of each optimizer first")
    device: str = _flag("cpu", "torch device, e.g. cuda")

    def __post_init__(self) -> None:
        _known_preset(self.preset, "--preset")
        _check(self.repeats >= 1, "--repeats", f"must be >= 1, got {self.repeats}")
        _check(self.warmup >= 0, "--warmup", f"must be >= 0, got {self.warmup}")


@dataclass
class LoaderBenchOptions(BenchOptions):
    summary: ClassVar[str] = "hvdllm's sharded loader against the same rows read from one np.memmap"

    data: str = _flag("data/demo", "a prepared dataset folder")
    batch_size: int = _flag(32, "samples per batch")
    batches: int = _flag(400, "batches per round (at most one epoch)")
    prefetch: int = _flag(4, "batches the loader reads ahead")
    rounds: int = _flag(6, "alternating rounds of both; the first is warm-up")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.batches >= 1, "--batches", f"must be >= 1, got {self.batches}")
        _check(self.prefetch >= 0, "--prefetch", f"must be >= 0, got {self.prefetch}")
        _check(self.rounds >= 2, "--rounds", f"must be >= 2 (the first is warm-up), got {self.rounds}")


@dataclass
class PrepareBenchOptions(BenchOptions):
    summary: ClassVar[str] = ("hvdllm prepare against raw Tokenizer.encode_batch (same bytes, tokenizer and "
                              "threads), 1 -> 2 ranks, and peak RSS on two corpus sizes")

    mb: float = _flag(10.0, "size of the synthetic JSONL corpus in MB")
    scale: float = _flag(20.0, "the second corpus, for peak RSS, is this many times larger")
    threads: int = _flag(2, "tokenizer threads of the raw baseline and of the 1-rank prepare")
    rounds: int = _flag(2, "rounds of raw, 1 rank and 2 ranks; the medians are reported")

    def __post_init__(self) -> None:
        _check(self.mb > 0, "--mb", f"must be > 0, got {self.mb}")
        _check(self.scale >= 1, "--scale", f"must be >= 1, got {self.scale}")
        _check(self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        _check(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")


@dataclass
class TrainingBenchOptions(BenchOptions):
    """A benchmark of training runs: a training config, overridable by --section.key=value."""

    takes_training_config: ClassVar[bool] = True

    config: str = _flag("configs/demo.toml", "training config (TOML)")
    steps: int = _flag(30, "training steps per run")
    rounds: int = _flag(5, _ROUNDS_HELP)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "--steps", f"must be >= 1, got {self.steps}")
        _check(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")


@dataclass
class OverheadBenchOptions(TrainingBenchOptions):
    summary: ClassVar[str] = "hvdllm train on 1 rank against a plain PyTorch loop with the same model and batch"

    rounds: int = _flag(8, _ROUNDS_HELP)  # one round's ratio can be 10% off either way on a shared machine
    threads: int = _flag(2, "torch threads of both")
    switches: tuple[str, ...] = _flag((), "speed switches, each run in every round and "
                                      "compared with hvdllm's default run: " +
                                      ", ".join(f"{k} ({' '.join(v)})" for k, v in SPEED_SWITCHES.items()))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.threads >= 1, "--threads", f"must be >= 1, got {self.threads}")
        _all_known(self.switches, "--switches", tuple(SPEED_SWITCHES), "switch")


@dataclass
class ScalingBenchOptions(TrainingBenchOptions):
    summary: ClassVar[str] = "weak scaling 1 -> 2 ranks (1 thread each) of hvdllm against torch DDP (gloo)"


@dataclass
class ZeroBenchOptions(TrainingBenchOptions):
    summary: ClassVar[str] = ("hvdllm train on 2 ranks at parallel.zero 0, 1 and 2: tokens/s and rank 0's "
                              "optimizer-state bytes")

    stages: tuple[str, ...] = _flag(("0", "1", "2"), "ZeRO stages to run (0 is the baseline of the ratios)")
    rounds: int = _flag(3, _ROUNDS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.stages) and len(set(self.stages)) == len(self.stages), "--stages",
               f"must name each stage once, got {','.join(self.stages)}")
        _all_known(self.stages, "--stages", ("0", "1", "2"), "ZeRO stage")


@dataclass
class PipelineBenchOptions(BenchOptions):
    summary: ClassVar[str] = ("measured bubble of GPipe and 1F1B against (p-1)/(m+p-1), and peak activation "
                              "memory per stage")

    stages: tuple[str, ...] = _flag(("2", "4"), "pipeline stages p, one mpirun job each (oversubscribed past the cores)")
    micro_batches: tuple[str, ...] = _flag(("1", "2", "4", "8"), "micro-batches m per batch")
    schedules: tuple[str, ...] = _flag(PIPELINE_SCHEDULES, "pipeline schedules")
    preset: str = _flag("gpt-mini", "model preset, cut into p stages balanced by FLOPs")
    batch_size: int = _flag(16, "samples per batch (divisible by every m)")
    seq_len: int = _flag(128, "tokens per sample")
    steps: int = _flag(5, "timed steps per case")
    warmup: int = _flag(2, "untimed steps per case first")
    plot: str = _flag("", "PNG of bubble against m; empty: next to --json")

    def __post_init__(self) -> None:
        _known_preset(self.preset, "--preset")
        _all_known(self.schedules, "--schedules", PIPELINE_SCHEDULES, "schedule")
        for flag, values in (("--stages", self.stages), ("--micro-batches", self.micro_batches)):
            _check(all(v.isdigit() and int(v) >= 1 for v in values), flag, f"must be whole numbers >= 1, got {values}")
        for m in self.micro_batch_counts:
            _check(self.batch_size % m == 0, "--batch-size", f"{self.batch_size} is not divisible by {m} micro-batches")
        _check(self.steps >= 1 and self.warmup >= 0, "--steps", "must be >= 1 (and --warmup >= 0)")

    @property
    def stage_counts(self) -> list[int]:
        return [int(v) for v in self.stages]

    @property
    def micro_batch_counts(self) -> list[int]:
        return [int(v) for v in self.micro_batches]


@dataclass
class LossRaceBenchOptions(BenchOptions):
    """Training runs raced to a validation loss (hvdllm/bench/curves.py): what they all take."""

    takes_training_config: ClassVar[bool] = True

    config: str = _flag("configs/demo.toml", "training config (TOML)")
    steps: int = _flag(60, "training steps per run")
    eval_every: int = _flag(5, "steps between evaluations (the points of each loss curve)")
    target_loss: float = _flag(0.0, "validation loss to reach; 0: the baseline's at 3/4 of its steps")
    timeout: int = _flag(1800, "seconds allowed per run")
    plot: str = _flag("", "PNG of validation loss against wall time; empty: next to --json")


@dataclass
class StragglerBenchOptions(LossRaceBenchOptions):
    summary: ClassVar[str] = ("sync, async (parameter server) and local-sgd with and without a slowed worker: "
                              "wall time and tokens to a fixed validation loss")

    target_loss: float = _flag(0.0, "validation loss to reach; 0: what sync without the straggler reaches at "
                                    "3/4 of its steps")
    cases: tuple[str, ...] = _flag(("sync", "async-0", "async-2", "async-8", "async-lb", "local-sgd-8"),
                                   "sync, async-S (max staleness S, one server), async-lb (S = 0, "
                                   "parallel.load_balance), local-sgd-H (H local steps)")
    workers: int = _flag(3, "worker ranks of every case (oversubscribed past the cores)")
    slowdown_factor: float = _flag(2.0, "the straggler's step takes this many times its compute time")

    def __post_init__(self) -> None:
        _check("sync" in self.cases, "--cases", "must include sync (the baseline of every ratio)")
        for case in self.cases:
            number = case.removeprefix("async-").removeprefix("local-sgd-")
            _check(case in ("sync", "async-lb") or (number != case and number.isdigit()), "--cases",
                   f"has unknown case {case!r} (sync, async-S, async-lb, local-sgd-H)")
        _check(self.workers >= 2, "--workers", f"must be >= 2 (one of them is slowed), got {self.workers}")
        _check(self.steps >= 1 and self.eval_every >= 1, "--steps", "and --eval-every must be >= 1")
        _check(self.slowdown_factor >= 1, "--slowdown-factor", f"must be >= 1, got {self.slowdown_factor}")


@dataclass
class GrowBenchOptions(LossRaceBenchOptions):
    summary: ClassVar[str] = ("a model grown from a smaller trained one against the same model from scratch: "
                              "wall time and tokens to a fixed validation loss")

    config: str = _flag("configs/demo.toml", "training config (TOML); its [model] is the large model")
    steps: int = _flag(60, "training steps of each large run (grown, scratch)")
    target_loss: float = _flag(0.0, "validation loss to reach; 0: what scratch reaches at 3/4 of its steps")
    small: tuple[str, ...] = _flag(("model.n_layer=2", "model.d_model=64", "model.n_head=2"),
                                   "section.key=value settings that make the small model from the config's")
    small_steps: int = _flag(60, "training steps of the small model")

    def __post_init__(self) -> None:
        for override in self.small:
            _check("=" in override and not override.startswith("-"), "--small",
                   f"takes section.key=value settings, got {override!r}")
        _check(min(self.small_steps, self.steps, self.eval_every) >= 1, "--steps",
               "--small-steps and --eval-every must be >= 1")


@dataclass
class TensorBenchOptions(BenchOptions):
    summary: ClassVar[str] = ("tensor parallelism's all-reduces at t = 2 over an mpi4py communicator against a Horovod "
                              "process set: latency per block and share of a training step")

    preset: str = _flag("gpt-mini", "model preset split over 2 ranks (its heads and vocabulary divide by 2)")
    batch_size: int = _flag(8, "samples per step")
    seq_len: int = _flag(128, "tokens per sample")
    steps: int = _flag(5, "timed steps per backend")
    warmup: int = _flag(2, "untimed steps per backend first")

    def __post_init__(self) -> None:
        _known_preset(self.preset, "--preset")
        _check(self.batch_size >= 1 and self.seq_len >= 1, "--batch-size", "and --seq-len must be >= 1")
        _check(self.steps >= 1 and self.warmup >= 0, "--steps", "must be >= 1 (and --warmup >= 0)")


BENCHMARKS: dict[str, type[BenchOptions]] = {
    "comm": CommBenchOptions, "optim": OptimBenchOptions, "loader": LoaderBenchOptions,
    "prepare": PrepareBenchOptions, "overhead": OverheadBenchOptions, "scaling": ScalingBenchOptions,
    "pipeline": PipelineBenchOptions, "straggler": StragglerBenchOptions, "grow": GrowBenchOptions,
    "tensor": TensorBenchOptions, "zero": ZeroBenchOptions,
}


# --- flags from fields --------------------------------------------------------------------

def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_text(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type[BenchOptions]) -> None:
    """One flag per field of ``cls``; its help shows the default unless that is empty."""
    kinds = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, text = kinds[f.name], f.metadata["help"].replace("%", "%%")
        if kind is bool:
            parser.add_argument(_flag_name(f.name), action="store_true", help=text)
            continue
        shown = _as_text(f.default)
        listed = kind == tuple[str, ...]
        parser.add_argument(_flag_name(f.name), type=_comma_list if listed else kind, default=f.default,
                            metavar="A,B,..." if listed else None,
                            help=f"{text} (default: {shown})" if shown else text)


def options_from(args: argparse.Namespace, cls: type[BenchOptions]) -> BenchOptions:
    """The options of ``cls`` from parsed flags (checked: a bad value is a UserError)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def as_argv(options: BenchOptions, names: tuple[str, ...]) -> list[str]:
    """The flags that give ``options`` its values of ``names``, e.g. for a sub-job."""
    argv = []
    for name in names:
        value = getattr(options, name)
        if isinstance(value, bool):
            argv += [_flag_name(name)] if value else []
        else:
            argv += [_flag_name(name), _as_text(value)]
    return argv


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    """``hvdllm bench NAME [flags]``: one sub-command per benchmark, with only its own flags."""
    commands = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, cls in BENCHMARKS.items():
        sub = commands.add_parser(name, help=cls.summary, description=cls.summary + ".")
        add_flags(sub, cls)
        sub.set_defaults(takes_overrides=cls.takes_training_config)
        if cls.takes_training_config:
            sub.epilog = "Any training config field can be overridden with --section.key=value, e.g. --optim.lr=3e-4."
