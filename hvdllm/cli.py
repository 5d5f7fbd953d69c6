"""The ``hvdllm`` command: one verb per step of the job.

Each verb's module is imported only when that verb runs, so ``hvdllm plan`` does not load
Horovod and ``hvdllm doctor`` still runs when Horovod is broken.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable, Sequence

from hvdllm import __version__
from hvdllm.errors import UserError, error_line


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


def _cmd_tune(args: argparse.Namespace, extra: list[str]) -> int:
    # The verb's flags are overrides of [tune] like any --tune.key=value, after the others.
    flags = {"trials": args.trials, "ranks": args.ranks, "sampler": args.sampler, "study": args.study}
    overrides = [*extra, *(f"--tune.{key}={value}" for key, value in flags.items() if value is not None)]
    cfg = _resolve_config(args, overrides)
    if cfg is None:
        return 0
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise UserError("hvdllm tune needs Optuna: make install, or pip install 'hvdllm[tune]'")
    from hvdllm.tune.run import run_tune

    return run_tune(cfg, args.config, overrides)


def _cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.plan import run_plan

    try:
        return run_plan(args)
    except ValueError as err:  # an unknown preset or a flag out of range
        raise UserError(str(err)) from None


def _cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.data.manifest import print_summary
    from hvdllm.data.prepare import PrepareOptions, run_prepare

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
    p.add_argument("--chunk-mb", type=float, default=d.chunk_mb,
                   help="input each rank finishes at a time; a rerun of a killed prepare skips finished chunks")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="tokenizer threads per rank (0: the node's cores divided by its ranks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.train.generate import generate_text

    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise UserError("--max-new-tokens, --temperature and --top-k must be >= 0")
    print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                        args.seed, args.device))
    return 0


def _cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.hf_gpt2 import export_hf
    from hvdllm.train.checkpoint import checkpoint_weights
    from hvdllm.train.generate import resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    out = export_hf(*checkpoint_weights(path), source=path, out=args.out, overwrite=args.overwrite)
    print(f"wrote {out} (transformers GPT-2: model.safetensors, config.json, tokenizer.json)")
    return 0


def _cmd_grow(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    cfg = _resolve_config(args, extra)
    if cfg is None:
        return 0
    from hvdllm.train.warm_start import describe, grow_checkpoint

    source, grown = grow_checkpoint(args.source, cfg, Path(args.out), args.overwrite)
    print(f"wrote {args.out}: {describe(grown)}, grown from {args.source} ({describe(source)}); "
          f"train from it with --train.init_from={args.out} and the same model settings")
    return 0


def _cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.train.report import run_report

    run_dir = args.run_dir
    if run_dir is None:
        if args.config is None and not extra:
            raise UserError("hvdllm report: give a run folder, or the training job's --config and overrides")
        cfg = _resolve_config(args, extra)
        if cfg is None:
            return 0
        run_dir = cfg.train.run_dir
    elif args.config is not None or extra:
        raise UserError("hvdllm report: give a run folder or a training config, not both")
    if args.end_left_running is not None:
        from hvdllm.train.status import end_job_left_running

        end_job_left_running(run_dir, args.end_left_running, args.since, args.grace_s)
        return 0
    return run_report(run_dir, job_ended=args.job_ended, since=args.since)


def _cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from hvdllm.bench.commands import run_bench

    return run_bench(args, extra)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="hvdllm", description="Train GPT-style language models with PyTorch on Horovod and MPI.")
    parser.add_argument("--version", action="version", version=f"hvdllm {__version__}")
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
    train.set_defaults(takes_overrides=True)
    handlers["train"] = _cmd_train

    tune = verbs.add_parser("tune", help="hyperparameter search: one `hvdllm train` job per trial ([tune] section)")
    _add_config_args(tune)
    tune.add_argument("--trials", type=int, help="finished trials the study should hold in all (tune.trials)")
    tune.add_argument("--ranks", type=int, help="MPI ranks per trial (tune.ranks)")
    tune.add_argument("--sampler", help="tpe | random | grid (tune.sampler)")
    tune.add_argument("--study", help="the study's folder (tune.study; default <train.run_dir>/tune)")
    tune.set_defaults(takes_overrides=True)
    handlers["tune"] = _cmd_tune

    gen = verbs.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True,
                     help="a .pt file, or a run folder (its best.pt, else its newest step-N.pt)")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    handlers["generate"] = _cmd_generate

    export = verbs.add_parser("export", help="write a checkpoint in another format (hf: a transformers folder)")
    export.add_argument("--checkpoint", required=True,
                        help="a .pt file, or a run folder (its best.pt, else its newest step-N.pt)")
    export.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers GPT-2 (safetensors)")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    handlers["export"] = _cmd_export

    grow = verbs.add_parser("grow", help="a larger model from a smaller one's checkpoint (function-preserving)")
    grow.add_argument("--from", dest="source", required=True,
                      help="a .pt file, a run folder (its best.pt, else its newest step-N.pt), or hf:DIR")
    grow.add_argument("--out", required=True, help="the checkpoint file to write (for --train.init_from)")
    grow.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_config_args(grow)
    grow.epilog = "The grown model is the config's [model], e.g. --model.n_layer=8 --model.d_model=256 --model.n_head=8."
    grow.set_defaults(takes_overrides=True)
    handlers["grow"] = _cmd_grow

    report = verbs.add_parser("report", help="summary, plot and status of a run folder; exits 1 if the run failed")
    report.add_argument("run_dir", nargs="?", help="the run folder (or: the job's --config and overrides)")
    _add_config_args(report)
    report.add_argument("--job-ended", action="store_true",
                        help="the job is over: a run still marked running (killed) fails too (for launch scripts)")
    report.add_argument("--since", type=float, default=0.0,
                        help="when the job started (seconds since the epoch): an older status is a previous job's")
    report.add_argument("--end-left-running", type=int, metavar="PID",
                        help="for launch scripts: wait while process PID (mpirun) runs; end it if it outlives "
                             "the run's end by --grace-s (a stopped rank the job went on without holds it)")
    report.add_argument("--grace-s", type=float, default=60.0, help="see --end-left-running")
    report.set_defaults(takes_overrides=True)
    handlers["report"] = _cmd_report

    from hvdllm.bench.options import add_bench_commands

    bench = verbs.add_parser("bench", help="benchmarks against a baseline in the same run")
    add_bench_commands(bench)
    handlers["bench"] = _cmd_bench

    plan = verbs.add_parser("plan", help="parameters, FLOPs, memory per GPU and time of a run")
    from hvdllm.plan import add_plan_arguments

    add_plan_arguments(plan)
    handlers["plan"] = _cmd_plan
    return parser, handlers


def _is_override(arg: str) -> bool:
    return arg.startswith("--") and "." in arg.split("=", 1)[0]


def _join_override_values(extra: list[str]) -> list[str]:
    """``--section.key value`` -> ``--section.key=value``, so both spellings work."""
    joined: list[str] = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        takes_value = _is_override(arg) and "=" not in arg
        if takes_value and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            joined.append(f"{arg}={extra[i + 1]}")
            i += 2
        else:
            joined.append(arg)
            i += 1
    return joined


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: ...)" to every option of every verb that has a default worth showing
    (argparse's ArgumentDefaultsHelpFormatter skips options without a help text, and the
    verbs' parsers are built in several modules)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _show_defaults(sub)
            continue
        # ``is``: a default of 0 is worth showing, though 0 == False.
        boring = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default == "" \
            or action.help == argparse.SUPPRESS
        if action.option_strings and not boring and "default" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


# How long a failing rank of a multi-rank job waits before ending the job, so that ranks
# failing the same way (the usual case: every rank checks the same input) print their own line.
_PEER_GRACE_S = 2.0


def _end_job(code: int) -> int:
    """After an error, end the whole job, not only this rank.

    A rank that merely returns leaves its peers waiting in a collective for ever, and itself
    too: MPI_Finalize at exit waits for them. So a rank of a multi-rank job aborts the MPI job
    (Horovod shares that MPI); without MPI (horovodrun --gloo) it exits at once, and the
    launcher ends the job when a rank exits non-zero. A single process simply returns.
    """
    from hvdllm.comm.launch import launched_world_size

    if launched_world_size() <= 1:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(_PEER_GRACE_S)
    from hvdllm.comm.mpi import abort_job

    abort_job(code)
    return code  # not reached: abort_job ends the process


def _report_crash(err: BaseException) -> None:
    """One line for an unexpected exception; the traceback only on request (with several
    ranks, interleaved tracebacks bury the line that matters)."""
    from hvdllm.comm.launch import launched_rank

    hint = "" if os.environ.get("HVDLLM_TRACEBACK") == "1" else "; set HVDLLM_TRACEBACK=1 for the traceback"
    if not hint:
        traceback.print_exc(file=sys.stderr)
    sys.stderr.write(f"{error_line(err)} (rank {launched_rank()}{hint})\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    _show_defaults(parser)
    # --section.key=value overrides come after a command's own flags; argparse leaves them in
    # ``extra``. Only commands that read a training config (takes_overrides) accept them.
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    extra = _join_override_values(extra)
    takes_overrides = getattr(args, "takes_overrides", False)
    stray = [a for a in extra if not _is_override(a)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}"
                     + (" (overrides are --section.key=value or --section.key value)" if takes_overrides else ""))
    try:
        if extra and not takes_overrides:
            command = " ".join(filter(None, ("hvdllm", args.verb, getattr(args, "benchmark", None))))
            raise UserError(f"{extra[0]}: `{command}` reads no training config, so it takes no "
                            "--section.key=value overrides")
        return handlers[args.verb](args, extra)
    except UserError as err:
        # One write per line: under mpirun the ranks' lines must not interleave mid-line.
        sys.stderr.write(f"{error_line(err)}\n")
        sys.stderr.flush()
        return _end_job(2)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug or an environment fault: still one line, and never a hang
        _report_crash(err)
        return _end_job(1)
