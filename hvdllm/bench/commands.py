"""Run one ``hvdllm bench`` sub-command: its options in, its result printed and written.

Each benchmark's module is imported only when it runs, as the CLI's verbs are.
"""

from __future__ import annotations

import argparse
import json

from hvdllm.bench.common import write_result
from hvdllm.bench.options import (BENCHMARKS, GrowBenchOptions, LoaderBenchOptions, OptimBenchOptions,
                                  OverheadBenchOptions, PipelineBenchOptions, PrepareBenchOptions,
                                  ScalingBenchOptions, StragglerBenchOptions, TensorBenchOptions, ZeroBenchOptions,
                                  options_from)


def _optim(options: OptimBenchOptions) -> tuple[dict, str]:
    from hvdllm.bench.optim import bench_optimizers

    result = bench_optimizers(options)
    return result, f"LAMB / AdamW(foreach) step time: {result['ratio_lamb_over_adamw']:.3f} (target <= 1.3)"


def _loader(options: LoaderBenchOptions) -> tuple[dict, str]:
    from hvdllm.bench.data import bench_loader

    result = bench_loader(options)
    rates = result["tokens_per_s"]
    return result, (f"loader {rates['hvdllm']:,.0f} tokens/s, memmap {rates['memmap']:,.0f}: "
                    f"ratio {result['ratio_hvdllm_over_memmap']:.3f} (target >= 0.5)")


def _prepare(options: PrepareBenchOptions) -> tuple[dict, str]:
    from hvdllm.bench.prepare import bench_prepare, summary

    result = bench_prepare(options)
    return result, summary(result)


def _overhead(options: OverheadBenchOptions, overrides: list[str]) -> tuple[dict, str]:
    from hvdllm.bench.train import bench_overhead

    result = bench_overhead(options, overrides)
    return result, (f"hvdllm train / plain PyTorch loop tokens/s: {result['ratio_hvdllm_over_plain']:.3f} in "
                    f"separate processes, {result['interleaved_ratio']:.3f} interleaved in one (target >= 0.95); "
                    f"time inside the step only. Whole loop (logging, metrics, data waits included): "
                    f"{result['loop_ratio_hvdllm_over_plain']:.3f}" +
                    "".join(f"\nspeed switch {name} ({' '.join(v['overrides'])}): x{v['ratio_over_default']:.3f} "
                            f"tokens/s of the default run, first step {v['first_step_s']:.2f} s (default "
                            f"{result['default_first_step_s']:.2f} s)" for name, v in result["speed_switches"].items()))


def _scaling(options: ScalingBenchOptions, overrides: list[str]) -> tuple[dict, str]:
    from hvdllm.bench.train import bench_weak_scaling

    result = bench_weak_scaling(options, overrides)
    eff = result["efficiency"]
    return result, (f"weak scaling 1 -> 2 ranks: hvdllm {eff['hvdllm']:.3f}, DDP gloo {eff['ddp_gloo']:.3f} "
                    "(target >= 0.85 and not below DDP)")


def _pipeline(options: PipelineBenchOptions) -> tuple[dict, str]:
    from hvdllm.bench.pipeline import bench_pipeline, plot_bubbles

    result = bench_pipeline(options)
    if options.plot_path:
        plot_bubbles(result, options.plot_path)
    rows = [f"p={c['stages']} m={c['micro_batches']} {c['schedule']}: {c['bubble_measured']:.3f} "
            f"(formula {c['bubble_formula']:.3f})" for c in result["cases"]]
    within = all(check["within"] for check in result["memory_checks"])
    return result, ("bubble, measured (formula): " + "; ".join(rows) +
                    f"\n1F1B peak activations <= GPipe's x p/m in every case: {within}")


def _straggler(options: StragglerBenchOptions, overrides: list[str]) -> tuple[dict, str]:
    from hvdllm.bench.straggler import bench_straggler, plot_straggler

    result = bench_straggler(options, overrides)
    if options.plot_path:
        plot_straggler(result, options.plot_path)
    def ratio(value):  # None: the case never reached the target loss
        return "never" if value is None else f"x{value:.2f}"

    rows = [f"{c['case']}{' +straggler' if c['straggler'] else ''}: time {ratio(c['time_ratio_to_sync'])}, "
            f"tokens {ratio(c['tokens_ratio_to_sync'])}" for c in result["cases"]]
    met = result["targets"]["met_by"]
    return result, (f"to val loss {result['target_val_loss']:.4f}, against sync: " + "; ".join(rows) +
                    f"\ntargets (time <= 0.8x with the straggler, tokens <= 1.1x without) met by: "
                    f"{', '.join(met) or 'none'}")


def _grow(options: GrowBenchOptions, overrides: list[str]) -> tuple[dict, str]:
    from hvdllm.bench.grow import bench_grow, plot_grow

    result = bench_grow(options, overrides)
    if options.plot_path:
        plot_grow(result, options.plot_path)
    times = {name: case["time_to_target_s"] for name, case in result["cases"].items()}
    if result["time_ratio_grown_over_scratch"] is None:
        return result, (f"to val loss {result['target_val_loss']:.4f}: grown {times['grown']}, scratch "
                        f"{times['scratch']} (None: never reached)")
    return result, (f"to val loss {result['target_val_loss']:.4f}: grown {times['grown']:.1f} s, scratch "
                    f"{times['scratch']:.1f} s: x{result['time_ratio_grown_over_scratch']:.2f} "
                    f"(x{result['time_ratio_with_small_training']:.2f} with the small model's "
                    f"{result['small_train_time_s']:.1f} s of training), tokens "
                    f"x{result['tokens_ratio_grown_over_scratch']:.2f}")


def _tensor(options: TensorBenchOptions) -> tuple[dict, str]:
    from hvdllm.bench.tensor import bench_tensor

    result = bench_tensor(options)
    rows = [f"{name}: activations' all-reduce {b['all_reduce_s'] * 1e6:.0f} us (a block's four "
            f"{b['block_all_reduces_s'] * 1e3:.2f} ms), a token vector's {b['token_vector_all_reduce_s'] * 1e6:.0f} us, "
            f"step {b['step_s'] * 1e3:.1f} ms of which collectives {b['collective_share']:.0%}"
            for name, b in result["backends"].items()]
    return result, ("\n".join(rows) + f"\nhorovod / mpi4py: activations x{result['horovod_over_mpi4py_latency']:.1f}, "
                    f"token vector x{result['horovod_over_mpi4py_token_vector']:.1f}, "
                    f"step x{result['horovod_over_mpi4py_step']:.2f}")


def _zero(options: ZeroBenchOptions, overrides: list[str]) -> tuple[dict, str]:
    from hvdllm.bench.zero import bench_zero, summary

    result = bench_zero(options, overrides)
    return result, summary(result)


_FLAGS_ONLY = {"optim": _optim, "loader": _loader, "prepare": _prepare, "pipeline": _pipeline, "tensor": _tensor}
_TRAINING = {"overhead": _overhead, "scaling": _scaling, "straggler": _straggler, "grow": _grow, "zero": _zero}


def run_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    """``overrides`` are --section.key=value of the training config; only the benchmarks
    that read one get any (the CLI refuses them for the others)."""
    options = options_from(args, BENCHMARKS[args.benchmark])
    if args.benchmark == "comm":  # an MPI job of its own: every rank runs it, rank 0 reports
        from hvdllm.bench.comm import run_comm_bench

        return run_comm_bench(options)
    if options.takes_training_config:
        from hvdllm.config import load_config

        load_config(options.config, overrides)  # a bad key or value fails here, in one line, before any run
        result, summary = _TRAINING[args.benchmark](options, overrides)
    else:
        result, summary = _FLAGS_ONLY[args.benchmark](options)
    print(json.dumps(result, indent=2))
    if options.json:
        write_result(options.json, result)
    print(summary)
    return 0
