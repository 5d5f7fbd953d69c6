"""Small corpora and CLI runners shared by the tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from hvdllm.comm.launch import mpi_environment, mpirun_command

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega tensor ring allreduce gradient shard rank").split()


def random_text(rng: random.Random, words: int) -> str:
    lines = []
    for _ in range(max(1, words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def make_corpus(folder: Path, files: int = 6, docs_per_jsonl: int = 5, seed: int = 0) -> Path:
    """Text files and a JSONL file of distinct random documents."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (folder / f"doc{i:02d}.txt").write_text(random_text(rng, 120 + 20 * i))
    with open(folder / "records.jsonl", "w") as f:
        for _ in range(docs_per_jsonl):
            f.write(json.dumps({"text": random_text(rng, 80)}) + "\n")
    return folder


def clean_env(base: dict | None = None) -> dict:
    """This process's environment without MPI job context: an in-process MPI singleton (from a
    test that ran run_prepare here) would otherwise leak its job into every child."""
    return mpi_environment(dict(os.environ if base is None else base, PYTHONUNBUFFERED="1"))


def hvdllm(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvdllm", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(env))


def hvdllm_mpi(np: int, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(mpirun_command(np, ["-m", "hvdllm", *args]), capture_output=True, text=True,
                          timeout=timeout, env=clean_env(env))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def make_dataset(folder: Path, seq_len: int = 32) -> Path:
    """A byte-tokenized dataset with train and val splits, prepared through the CLI."""
    make_corpus(folder / "corpus", files=12, docs_per_jsonl=20)
    result = hvdllm("prepare", str(folder / "corpus"), "--out", str(folder / "data"), "--tokenizer", "byte",
                    "--seq-len", str(seq_len), "--val-fraction", "0.15", "--min-chars", "16",
                    "--samples-per-shard", "64")
    assert result.returncode == 0, result.stderr
    return folder / "data"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def assert_same_losses(reference: Path, other: Path, steps: int, rel: float = 1e-5) -> None:
    """Both runs logged ``steps`` losses, each within ``rel`` (relative) of the reference's."""
    a, b = losses(reference), losses(other)
    assert len(a) == len(b) == steps
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst < rel, worst


NANO = str(Path(__file__).resolve().parents[2] / "configs" / "test-nano.toml")


def train_args(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["train", "--config", NANO, f"--data.path={data}", f"--train.run_dir={run_dir}",
            "--train.threads=1", *overrides]


def rank_pids(proc: subprocess.Popen | int) -> list[int]:
    """The ranks mpirun ``proc`` (or the mpirun of that pid) started, by rank: each child's
    OMPI_COMM_WORLD_RANK, since pids wrap around (pid_max is often 32768) and their order is
    not the launch order."""
    mpirun = proc if isinstance(proc, int) else proc.pid
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(mpirun)], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"OMPI_COMM_WORLD_RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    return [ranks[r] for r in sorted(ranks)]
