"""`hvdllm bench comm` under mpirun -np 2: every backend available here, every result right."""

import json

from helpers.corpus import error_lines, hvdllm_mpi

KEYS = {"backend", "op", "dtype", "bytes", "np", "time_s", "algbw_GBps", "busbw_GBps", "correct"}


def test_comm_bench_measures_every_backend(tmp_path):
    out = tmp_path / "comm.json"
    result = hvdllm_mpi(2, "bench", "comm", "--sizes", "8B:64KB", "--factor", "64", "--iters", "3", "--warmup", "1",
                        "--dtypes", "fp32,bf16", "--json", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert {r["backend"] for r in records} == {"mpi4py", "torch-gloo", "horovod-mpi", "horovod-gloo"}
    assert all(KEYS <= set(r) for r in records)
    assert all(r["correct"] and r["np"] == 2 for r in records)
    assert all(r["checked"] == 1 + 3 for r in records)  # the first call and every timed one
    ops = {(r["backend"], r["op"]) for r in records}
    assert ("mpi4py", "sendrecv") in ops and ("horovod-mpi", "reducescatter") in ops
    # What this build or machine lacks is skipped with a line saying why.
    assert any(s.startswith("horovod-nccl: no CUDA") for s in report["skipped"])
    assert any("Horovod has no point-to-point" in s for s in report["skipped"])
    assert any("MPI has no standard fp16/bf16" in s for s in report["skipped"])
    assert set(report["ring_fit"]) >= {"mpi4py", "horovod-mpi"}
    assert (tmp_path / "comm.png").stat().st_size > 5000
    assert "correctness: " in result.stdout and "ring model mpi4py" in result.stdout


def test_comm_bench_bad_arguments():
    for args, message in ((["--sizes", "8B-1MB"], "malformed --sizes"),
                          (["--backends", "mpi4py,nccl2"], "unknown backend 'nccl2'"),
                          (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
                          (["--ops", "allreduce,scan"], "unknown op 'scan'"),
                          (["--tune-preset", "gpt-huge"], "unknown model preset 'gpt-huge'")):
        result = hvdllm_mpi(2, "bench", "comm", *args, timeout=120)
        assert result.returncode != 0
        lines = error_lines(result)
        assert len(lines) == 2 and message in lines[0], result.stderr
