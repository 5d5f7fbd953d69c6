"""`hvdllm bench NAME`: one sub-command per benchmark, its flags generated from its options
dataclass, overrides only where a training config is read, and those reaching every run."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from helpers.corpus import NANO

from hvdllm import cli
from hvdllm.bench import train as bench_train
from hvdllm.bench.comm import SWEEP_FLAGS
from hvdllm.bench.options import BENCHMARKS, SPEED_SWITCHES, CommBenchOptions, as_argv, options_from

# A --flag, but not the --section of a --section.key=value mentioned in a help text.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*(?![\w.-])")


def _help(name: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", name, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_each_benchmark_help_lists_only_its_own_flags_with_defaults(name, capsys, monkeypatch):
    text = _help(name, capsys, monkeypatch)
    fields = dataclasses.fields(BENCHMARKS[name])
    own = {"--" + f.name.replace("_", "-") for f in fields}
    assert set(FLAG.findall(text)) - {"--help"} == own
    for f in fields:
        shown = ",".join(f.default) if isinstance(f.default, tuple) else str(f.default)
        if shown and not isinstance(f.default, bool):
            assert f"(default: {shown})" in text, f.name


def test_bench_without_a_benchmark_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench"])
    assert exit_.value.code == 2
    assert "usage: hvdllm bench" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["comm", "optim", "loader", "prepare", "pipeline"])
def test_override_on_a_benchmark_without_training_config_is_a_one_line_error(name, capsys, monkeypatch):
    def must_not_run(*args):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("hvdllm.bench.commands.run_bench", must_not_run)
    assert cli.main(["bench", name, "--optim.lr=3e-4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --optim.lr=3e-4: ")
    assert f"`hvdllm bench {name}` reads no training config" in err


@pytest.mark.parametrize("name", ["overhead", "scaling"])
def test_overrides_reach_every_run_of_a_training_benchmark(name, tmp_path, capsys, monkeypatch):
    """Every process the benchmark launches (hvdllm train, the plain or DDP baseline) and the
    in-process interleaved comparison get the config and the override."""
    launched, interleaved = [], []

    def fake_run(cmd: list[str], env: dict | None = None) -> str:
        launched.append(cmd)
        run_dir = next((a.split("=", 1)[1] for a in cmd if a.startswith("--train.run_dir=")), None)
        if run_dir:  # hvdllm train: the metrics it would write
            records = [json.dumps({"tokens_per_s": 100.0, "step_time_s": 0.1, "elapsed_s": 0.1 * (i + 1),
                                   "optimizer_state_bytes": 1000})
                       for i in range(bench_train.WARMUP_STEPS + 3)]
            (Path(run_dir) / "metrics.jsonl").write_text("\n".join(records) + "\n")
            return ""
        return json.dumps({"step": 50.0, "loop": 50.0}) + "\n"  # a baseline prints its tokens/s

    def fake_interleaved(config, overrides, steps, threads):
        interleaved.append(overrides)
        return 1.0

    monkeypatch.setattr(bench_train, "run_command", fake_run)
    monkeypatch.setattr(bench_train, "interleaved_ratio", fake_interleaved)
    override = "--optim.lr=1e-3"
    switches = ["--switches", ",".join(SPEED_SWITCHES)] if name == "overhead" else []
    assert cli.main(["bench", name, "--config", NANO, "--rounds", "1", "--steps", "4", *switches, override]) == 0
    assert len(launched) == (2 + len(SPEED_SWITCHES) if name == "overhead" else 4)
    for cmd in launched:
        assert NANO in cmd and override in cmd, cmd
    if name == "overhead":  # each speed switch in its own run (of hvdllm train), and only there
        for switch in SPEED_SWITCHES.values():
            assert sum(all(flag in cmd for flag in switch) for cmd in launched) == 1
    assert interleaved == ([[override]] if name == "overhead" else [])
    assert f'"overrides": [\n    "{override}"\n  ]' in capsys.readouterr().out


def test_comm_sweep_flags_passed_to_the_gloo_subjob_give_back_the_same_sweep():
    options = CommBenchOptions(sizes="1KB:1MB", factor=32, dtypes=("fp32", "bf16"), ops=("allreduce", "alltoall"),
                               warmup=0, iters=3, backends=("mpi4py",), tune_preset="gpt-nano")
    parser, _ = cli.build_parser()
    args = parser.parse_args(["bench", "comm", *as_argv(options, SWEEP_FLAGS)])
    again = options_from(args, CommBenchOptions)
    assert again.backends == () and again.tune_preset == ""  # the sub-job's own, not the sweep's
    assert dataclasses.replace(again, backends=options.backends, tune_preset=options.tune_preset) == options
