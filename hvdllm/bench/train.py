"""Training benchmarks, each against a baseline in the same run:

- overhead: tokens/s of ``hvdllm train`` on 1 rank against a minimal plain PyTorch loop over
  the same model, optimizer, batch and threads; in separate processes, and step by step
  interleaved in one process;
- weak scaling: 2 ranks against 1 (one torch thread per rank) for hvdllm (Horovod) and for
  torch DDP with the gloo backend.

Every measurement is its own process (``python -m hvdllm.bench.train MODE ...``), launched
with mpirun where it has 2 ranks. Each gives two figures, both after the warm-up steps:

- ``step``: the median over steps of tokens / the time inside one step (hvdllm: inside
  ``Trainer.train_step``: forward, backward, exchange, clip, update; the loop around it,
  metrics, logging and reading ahead of the next batch are outside);
- ``loop``: all tokens / the wall-clock time of the whole loop over those steps (hvdllm:
  from its metrics' ``elapsed_s``, so logging, metrics and data waits are in it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hvdllm.bench.options import SPEED_SWITCHES, OverheadBenchOptions, ScalingBenchOptions
from hvdllm.comm.launch import mpi_environment, mpirun_command
from hvdllm.config import load_config

WARMUP_STEPS = 3


def _build(cfg):
    from hvdllm.data import ShardedSamples
    from hvdllm.data.shards import read_manifest
    from hvdllm.model import GPT, gpt_config_from
    from hvdllm.optim import build_optimizer

    manifest = read_manifest(cfg.data.path)
    torch.manual_seed(cfg.train.seed)
    model = GPT(gpt_config_from(cfg.model, vocab_size=manifest["vocab_size"]))
    samples = ShardedSamples(cfg.data.path, "train")
    seq = cfg.data.seq_len or manifest["seq_len"]
    rows = samples.rows(torch.randperm(len(samples))[: cfg.data.batch_size * 8].numpy())[0][:, : seq + 1]
    batches = [torch.from_numpy(rows[i::8]) for i in range(8)]
    return model, build_optimizer, batches


def _plain_step(model, optimizer, batch: torch.Tensor, grad_clip: float) -> float:
    """The minimal step: forward, backward, clip, update. Returns its seconds."""
    start = time.perf_counter()
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def plain_loop(cfg, steps: int, ddp_rank: tuple[int, int] | None = None) -> dict:
    """The minimal loop; with ``ddp_rank`` = (rank, world size), torch DDP over gloo.
    Returns global tokens/s: {"step": median over steps, "loop": the whole loop}."""
    model, build_optimizer, batches = _build(cfg)
    rank, world = ddp_rank or (0, 1)
    if ddp_rank:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=os.environ["HVDLLM_BENCH_INIT"], rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model.module if ddp_rank else model, cfg.optim)
    times, ends = [], []
    for step in range(steps):
        times.append(_plain_step(model, optimizer, batches[(step * world + rank) % len(batches)], cfg.optim.grad_clip))
        ends.append(time.perf_counter())
    tokens = world * batches[0].shape[0] * (batches[0].shape[1] - 1)
    loop_s = ends[-1] - ends[WARMUP_STEPS - 1]
    return {"step": tokens / statistics.median(times[WARMUP_STEPS:]), "loop": tokens * (steps - WARMUP_STEPS) / loop_s}


def interleaved_ratio(config: str, overrides: list[str], steps: int, threads: int) -> float:
    """hvdllm's ``Trainer.train_step`` and the plain step, alternately in one process: each
    pair of steps sees the same machine, so the median ratio of step rates is the loop's own
    cost, free of the noise between processes (what it cannot see: threads or start-up a
    framework adds to its process; the separate-process rounds catch those)."""
    from hvdllm.parallel import build_strategy, resolve_batching
    from hvdllm.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(config, [*overrides, f"--train.run_dir={run_dir}", f"--train.steps={steps}",
                                   "--log.tensorboard=false", "--log.progress=false"])
        cfg = resolve_batching(cfg, world_size=1)  # as `hvdllm train` runs in one process
        strategy = build_strategy(cfg, world_size=1)
        strategy.setup(threads)  # sets torch's threads for both loops
        trainer = Trainer(cfg, strategy, torch.device("cpu"))
        model, build_optimizer, batches = _build(cfg)
        optimizer = build_optimizer(model, cfg.optim)
        ratios = []
        try:
            for step in range(steps):
                batch, seconds = batches[step % len(batches)], {}
                for name in alternating(["plain", "hvdllm"], step):
                    if name == "plain":
                        seconds[name] = _plain_step(model, optimizer, batch, cfg.optim.grad_clip)
                    else:
                        seconds[name] = trainer.train_step().step_time_s
                        trainer.step += 1
                ratios.append(seconds["plain"] / seconds["hvdllm"])
        finally:
            trainer.close()
    return statistics.median(ratios[WARMUP_STEPS:])


def run_command(cmd: list[str], env: dict | None = None) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=mpi_environment(env), timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _baseline(config: str, overrides: list[str], steps: int, threads: int, np: int = 1) -> dict:
    argv = ["-m", "hvdllm.bench.train", "plain" if np == 1 else "ddp", "--config", config, "--steps", str(steps),
            "--threads", str(threads), *overrides]
    env = dict(os.environ, HVDLLM_BENCH_INIT=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}")
    out = run_command(mpirun_command(np, argv) if np > 1 else [sys.executable, *argv], env)
    return json.loads(out.strip().splitlines()[-1])


def hvdllm_run(config: str, overrides: list[str], steps: int, threads: int, np: int = 1) -> dict:
    """``hvdllm train`` for ``steps`` steps: tokens/s ("step" and "loop", see the module's
    docstring), the first step's seconds, and the bytes of optimizer state and gradients the
    logging rank held at the end (gradients: None where the run does not log them)."""
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["-m", "hvdllm", "train", "--config", config, f"--train.run_dir={run_dir}", f"--train.steps={steps}",
                f"--train.threads={threads}", "--train.eval_every=0", "--checkpoint.every=0",
                "--checkpoint.keep_best=false", "--log.every=1", "--log.tensorboard=false", "--log.progress=false",
                "--log.plot=false", *overrides]
        run_command(mpirun_command(np, argv) if np > 1 else [sys.executable, *argv])
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    after = records[WARMUP_STEPS:]
    looped = after[:-1]  # the last step also runs the final evaluation, which the baseline lacks
    loop_s = looped[-1]["elapsed_s"] - records[WARMUP_STEPS - 1]["elapsed_s"]
    return {"step": statistics.median(r["tokens_per_s"] for r in after),
            "loop": sum(r["tokens_per_s"] * r["step_time_s"] for r in looped) / loop_s,
            "first_step_s": records[0]["step_time_s"],  # what a compiling switch pays once
            "optimizer_state_bytes": records[-1]["optimizer_state_bytes"],
            "gradient_bytes": records[-1].get("gradient_bytes")}


def _switched(extra: tuple[str, ...]):
    """``hvdllm_run`` with a speed switch's overrides added."""
    def run(config: str, overrides: list[str], steps: int, threads: int) -> dict:
        return hvdllm_run(config, [*overrides, *extra], steps, threads)
    return run


def bench_overhead(options: OverheadBenchOptions, overrides: list[str]) -> dict:
    """Paired rounds of baseline and hvdllm; the reported ratio is the median of the rounds'
    ratios (on a shared machine one round can be 10% off either way). The order within a
    round alternates (ABBA...), so a machine that slows down or speeds up during the run
    favours neither side. ``overrides`` (--section.key=value) apply to the config of both."""
    config, steps, threads = options.config, options.steps, options.threads
    runs = {"plain": _baseline, "hvdllm": hvdllm_run, **{name: _switched(SPEED_SWITCHES[name]) for name in options.switches}}
    measured_rounds = []
    for index in range(options.rounds):
        measured_rounds.append({name: runs[name](config, overrides, steps, threads)
                                for name in alternating(list(runs), index)})
    plain, ours = [m["plain"] for m in measured_rounds], [m["hvdllm"] for m in measured_rounds]
    switches = {name: {"overrides": list(SPEED_SWITCHES[name]),
                       "tokens_per_s": statistics.median(m[name]["step"] for m in measured_rounds),
                       "ratio_over_default": statistics.median(m[name]["step"] / m["hvdllm"]["step"]
                                                               for m in measured_rounds),
                       "first_step_s": statistics.median(m[name]["first_step_s"] for m in measured_rounds)}
                for name in options.switches}
    ratios = [h["step"] / p["step"] for h, p in zip(ours, plain)]
    loop_ratios = [h["loop"] / p["loop"] for h, p in zip(ours, plain)]
    return {"benchmark": "framework_overhead", "config": config, "overrides": overrides, "steps": steps,
            "threads": threads,
            "figures": {"tokens_per_s": "median over steps of tokens / time inside one step (hvdllm: "
                                        "Trainer.train_step; metrics, logging and the loop around it not included)",
                        "loop_tokens_per_s": "tokens / wall-clock time of the whole loop after warm-up (hvdllm: "
                                             "from metrics elapsed_s; logging, metrics and data waits included)"},
            "tokens_per_s": {"plain_pytorch": statistics.median(p["step"] for p in plain),
                             "hvdllm": statistics.median(h["step"] for h in ours)},
            "loop_tokens_per_s": {"plain_pytorch": statistics.median(p["loop"] for p in plain),
                                  "hvdllm": statistics.median(h["loop"] for h in ours)},
            "rounds": {"plain": plain, "hvdllm": ours, "ratio": ratios, "loop_ratio": loop_ratios},
            "ratio_hvdllm_over_plain": statistics.median(ratios),
            "loop_ratio_hvdllm_over_plain": statistics.median(loop_ratios),
            "interleaved_ratio": interleaved_ratio(config, overrides, 2 * steps, threads),
            "target_ratio_min": 0.95,
            "default_first_step_s": statistics.median(h["first_step_s"] for h in ours),
            "speed_switches": switches}


def bench_weak_scaling(options: ScalingBenchOptions, overrides: list[str]) -> dict:
    """Efficiency = tokens/s on 2 ranks / (2 x tokens/s on 1 rank), per round, median. Within a
    round each framework's 1-rank and 2-rank runs are adjacent, and which framework goes
    first alternates between rounds. ``overrides`` (--section.key=value) apply to every run."""
    config, steps = options.config, options.steps
    runs = {"hvdllm": hvdllm_run, "ddp_gloo": _baseline}
    per_round = {name: [] for name in runs}
    one = {name: [] for name in runs}
    two = {name: [] for name in runs}
    for index in range(options.rounds):
        for name in alternating(list(runs), index):
            run = runs[name]
            # The in-step figure: scaling of the step itself, as DDP's baseline measures it.
            single = run(config, overrides, steps, 1, np=1)["step"]
            pair = run(config, overrides, steps, 1, np=2)["step"]
            one[name].append(single)
            two[name].append(pair)
            per_round[name].append(pair / (2 * single))
    efficiency = {name: statistics.median(values) for name, values in per_round.items()}
    return {"benchmark": "weak_scaling", "config": config, "overrides": overrides, "steps": steps,
            "threads_per_rank": 1, "tokens_per_s_1_rank": one, "tokens_per_s_2_ranks": two,
            "efficiency_per_round": per_round, "efficiency": efficiency, "target_efficiency_min": 0.85,
            "hvdllm_not_below_ddp": efficiency["hvdllm"] >= efficiency["ddp_gloo"]}


def alternating(names: list[str], round_index: int) -> list[str]:
    """The order of a round's runs: reversed every other round, so that drift favours none."""
    return names if round_index % 2 == 0 else names[::-1]


def main() -> None:
    """One baseline measurement (what ``_baseline`` launches); prints tokens/s on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["plain", "ddp"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides)
    if args.mode == "plain":
        print(json.dumps(plain_loop(cfg, args.steps)))
        return
    from mpi4py import MPI  # the DDP ranks are an MPI job (_baseline launches them with mpirun)

    world = MPI.COMM_WORLD
    tokens_per_s = plain_loop(cfg, args.steps, ddp_rank=(world.rank, world.size))
    if world.rank == 0:
        print(json.dumps(tokens_per_s))


if __name__ == "__main__":
    main()
