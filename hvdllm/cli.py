"""The ``hvdllm`` command: one verb per stage of the job.

Each verb's module is imported only when that verb runs, so ``hvdllm plan`` does not load
Horovod and ``hvdllm doctor`` still runs when Horovod is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from hvdllm.errors import UserError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit")
    parser.epilog = "Any config field can be overridden with --section.key=value, e.g. --optim.lr=3e-4."


def _resolve_config(args: argparse.Namespace, overrides: list[str]):
    from hvdllm.config import config_to_toml, load_config

    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_to_toml(cfg), end="")
        return None
    return cfg


def _cmd_doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.doctor import run_doctor

    return run_doctor(ranks=args.ranks)


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _resolve_config(args, extra)
    if cfg is None:
        return 0
    from hvdllm.train.run import run_training

    return run_training(cfg)


def _cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.plan import run_plan

    try:
        return run_plan(args)
    except ValueError as err:  # an unknown preset or a flag out of range
        raise UserError(str(err)) from None


def _cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.data.prepare import PrepareOptions, print_summary, run_prepare

    opts = PrepareOptions(**{k: v for k, v in vars(args).items() if k in PrepareOptions.__dataclass_fields__})
    manifest = run_prepare(opts)
    if manifest:
        print_summary(manifest)
        print(f"wrote {opts.out}/manifest.json")
    return 0


def _cmd_verify(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.data.shards import verify_folder

    problems = verify_folder(args.folder)
    for line in problems:
        print(f"bad: {line}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.folder}", file=sys.stderr)
        return 1
    print(f"verify: {args.folder} is sound")
    return 0


def _add_prepare_parser(verbs) -> None:
    from hvdllm.data.prepare import PrepareOptions

    d = PrepareOptions(out="")
    p = verbs.add_parser("prepare", help="clean, dedup, tokenize and pack text into HDF5 shards")
    p.add_argument("inputs", nargs="*", help="files, folders or globs of .txt/.md/.py/.jsonl[.gz]")
    p.add_argument("--out", required=True, help="output folder for manifest.json and the shards")
    p.add_argument("--preset", default="", help="built-in corpus instead of inputs: python-stdlib")
    p.add_argument("--text-field", default=d.text_field, help="JSONL field with the text")
    p.add_argument("--strict", action="store_true", help="a malformed JSONL line is an error")
    p.add_argument("--min-chars", type=int, default=d.min_chars, help="drop shorter documents")
    p.add_argument("--max-noise", type=float, default=d.max_noise,
                   help="drop documents with a larger share of replacement/non-printable characters")
    p.add_argument("--near-dup-threshold", type=float, default=d.near_dup_threshold,
                   help="MinHash Jaccard threshold for near duplicates; 0 = off")
    p.add_argument("--shingle", type=int, default=d.shingle, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=d.num_perm, help="MinHash permutations")
    p.add_argument("--tokenizer", default=d.tokenizer, help="bpe | byte | path to tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    p.add_argument("--tokenizer-sample-mb", type=float, default=d.tokenizer_sample_mb)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sample (+1 for the target)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.train.generate import generate_text

    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise UserError("--max-new-tokens, --temperature and --top-k must be >= 0")
    print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                        args.seed, args.device))
    return 0


def _cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.train.report import run_report

    return run_report(args.run_dir)


def _cmd_bench_comm(args: argparse.Namespace) -> int:
    from hvdllm.bench import comm_report
    from hvdllm.bench.comm import CommPlan, run_comm_bench

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    for dtype in split(args.dtypes):
        if dtype not in ("fp32", "fp16", "bf16"):
            raise UserError(f"unknown dtype {dtype!r} in --dtypes (fp32, fp16, bf16)")
    for op in split(args.ops):
        if op not in comm_report.OPS:
            raise UserError(f"unknown op {op!r} in --ops ({', '.join(comm_report.OPS)})")
    if args.warmup < 0 or args.iters < 1:
        raise UserError("--warmup must be >= 0 and --iters >= 1")
    plan = CommPlan(sizes=comm_report.parse_sizes(args.sizes, args.factor), dtypes=split(args.dtypes),
                    ops=split(args.ops), warmup=args.warmup, iters=args.iters)
    passthrough = ["--sizes", args.sizes, "--factor", str(args.factor), "--dtypes", args.dtypes, "--ops", args.ops,
                   "--warmup", str(args.warmup), "--iters", str(args.iters)]
    plot = None if args.no_plot else (args.plot or (args.json.rsplit(".", 1)[0] + ".png" if args.json else None))
    return run_comm_bench(plan, split(args.backends), args.json, plot, args.tune_preset, args.tune_repeats, passthrough)


def _cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.bench.common import write_result

    if args.what == "comm":
        return _cmd_bench_comm(args)
    rounds = {"rounds": args.rounds} if args.rounds else {}  # else each benchmark's default
    if args.what == "optim":
        from hvdllm.bench.optim import bench_optimizers

        result = bench_optimizers(args.preset, repeats=args.repeats, device=args.device)
        summary = f"LAMB / AdamW(foreach) step time: {result['ratio_lamb_over_adamw']:.3f} (target <= 1.3)"
    elif args.what == "loader":
        from hvdllm.bench.data import bench_loader

        result = bench_loader(args.data, batch_size=args.batch_size, batches=args.batches)
        summary = (f"loader {result['tokens_per_s']['hvdllm']:,.0f} tokens/s, memmap "
                   f"{result['tokens_per_s']['memmap']:,.0f}: ratio {result['ratio_hvdllm_over_memmap']:.3f} (target >= 0.5)")
    elif args.what == "prepare":
        from hvdllm.bench.data import prepare_throughput

        result = {"benchmark": "prepare", **prepare_throughput(f"{args.data}/manifest.json")}
        summary = (f"prepare: {result['mb_per_s_per_rank']:.2f} MB/s per rank on {result['ranks']} rank(s); shares: "
                   + ", ".join(f"{k} {v:.0%}" for k, v in result["share"].items()))
    elif args.what == "overhead":
        from hvdllm.bench.train import bench_overhead

        result = bench_overhead(args.config, extra, steps=args.steps, threads=args.threads, **rounds)
        summary = (f"hvdllm train / plain PyTorch loop tokens/s: {result['ratio_hvdllm_over_plain']:.3f} in separate "
                   f"processes, {result['interleaved_ratio']:.3f} interleaved in one (target >= 0.95)")
    else:
        from hvdllm.bench.train import bench_weak_scaling

        result = bench_weak_scaling(args.config, extra, steps=args.steps, **rounds)
        eff = result["efficiency"]
        summary = (f"weak scaling 1 -> 2 ranks: hvdllm {eff['hvdllm']:.3f}, DDP gloo {eff['ddp_gloo']:.3f} "
                   f"(target >= 0.85 and not below DDP)")
    print(json.dumps(result, indent=2))
    if args.json:
        write_result(args.json, result)
    print(summary)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="hvdllm", description="Train GPT-style language models with PyTorch on Horovod and MPI.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    handlers: dict[str, Callable] = {}

    doctor = verbs.add_parser("doctor", help="check torch, Horovod, MPI, h5py and tokenizers")
    doctor.add_argument("--ranks", type=int, default=0,
                        help="also run a Horovod allreduce over this many local ranks")
    handlers["doctor"] = _cmd_doctor

    _add_prepare_parser(verbs)
    handlers["prepare"] = _cmd_prepare
    verify = verbs.add_parser("verify", help="check every shard of a folder against its manifest")
    verify.add_argument("folder")
    handlers["verify"] = _cmd_verify

    train = verbs.add_parser("train", help="train a GPT (launch with horovodrun / mpirun for several ranks)")
    _add_config_args(train)
    handlers["train"] = _cmd_train

    gen = verbs.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="a .pt file, e.g. runs/demo/checkpoints/best.pt")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    handlers["generate"] = _cmd_generate

    report = verbs.add_parser("report", help="summary and plot of a run folder")
    report.add_argument("run_dir")
    handlers["report"] = _cmd_report

    from hvdllm.config import BenchConfig

    comm_defaults = BenchConfig()  # the comm sweep's defaults live with the other config
    bench = verbs.add_parser("bench", help="benchmarks against a baseline in the same run")
    bench.add_argument("what", choices=["comm", "optim", "loader", "prepare", "overhead", "scaling"])
    bench.add_argument("--sizes", default=comm_defaults.sizes, help="comm: message sizes MIN:MAX, e.g. 8B:256MB")
    bench.add_argument("--factor", type=int, default=comm_defaults.factor, help="comm: size multiplier between steps")
    bench.add_argument("--dtypes", default=",".join(comm_defaults.dtypes), help="comm: comma list of fp32, fp16, bf16")
    bench.add_argument("--ops", default="allreduce,allgather,broadcast,reducescatter,alltoall,sendrecv",
                       help="comm: comma list of operations")
    bench.add_argument("--warmup", type=int, default=comm_defaults.warmup, help="comm: warm-up iterations per size")
    bench.add_argument("--iters", type=int, default=comm_defaults.iters, help="comm: timed iterations per size")
    bench.add_argument("--backends", default=",".join(comm_defaults.backends),
                       help="comm: comma list (default: every one available): "
                       "mpi4py, torch-gloo, horovod-mpi, horovod-gloo, horovod-nccl, torch-nccl")
    bench.add_argument("--plot", help="comm: PNG of busbw against size (default: next to --json)")
    bench.add_argument("--no-plot", action="store_true")
    bench.add_argument("--tune-preset", default="", help="comm: also sweep Horovod cycle time x fusion threshold "
                       "on this preset's gradients, e.g. gpt-mini")
    bench.add_argument("--tune-repeats", type=int, default=10)
    bench.add_argument("--json", help="write the result here")
    bench.add_argument("--preset", default="gpt2-small", help="optim: parameter shapes of this model")
    bench.add_argument("--repeats", type=int, default=15)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--data", default="data/demo", help="loader/prepare: a prepared folder")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--batches", type=int, default=400)
    bench.add_argument("--config", default="configs/demo.toml", help="overhead/scaling: training config")
    bench.add_argument("--steps", type=int, default=30)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--rounds", type=int, default=0,
                       help="overhead/scaling: paired rounds, the median is reported (default 8 and 5)")
    handlers["bench"] = _cmd_bench

    plan = verbs.add_parser("plan", help="parameters, FLOPs, memory per GPU and time of a run")
    from hvdllm.plan import add_plan_arguments

    add_plan_arguments(plan)
    handlers["plan"] = _cmd_plan
    return parser, handlers


# Verbs that take --section.key=value overrides after their own flags.
_CONFIG_VERBS = {"train", "bench"}


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _CONFIG_VERBS:
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if not (a.startswith("--") and "." in a.split("=", 1)[0])]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are --section.key=value)")
    else:
        args, extra = parser.parse_args(argv), []
    try:
        return handlers[args.verb](args, extra)
    except UserError as err:
        # One write per line: under mpirun the ranks' lines must not interleave mid-line.
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        return 130
