import numpy as np
import pytest

from hvdllm.bench import comm_report as rep
from hvdllm.errors import UserError


def test_parse_sizes():
    assert rep.parse_sizes("8B:128B", 4) == [8, 32, 128]
    assert rep.parse_sizes("1KB:1MB", 32) == [1024, 32768, 1 << 20]
    assert rep.parse_sizes("64MB:256MB", 2) == [64 << 20, 128 << 20, 256 << 20]
    for bad in ("8B", "8X:1MB", "1MB:8B", "a:b", "0B:8B"):
        with pytest.raises(UserError):
            rep.parse_sizes(bad, 2)
    with pytest.raises(UserError, match="--factor"):
        rep.parse_sizes("8B:1MB", 1)


def test_bus_factors_follow_nccl_tests():
    assert rep.bus_factor("allreduce", 8) == pytest.approx(2 * 7 / 8)
    for op in ("allgather", "reducescatter", "alltoall"):
        assert rep.bus_factor(op, 4) == pytest.approx(3 / 4)
    assert rep.bus_factor("broadcast", 4) == 1.0 and rep.bus_factor("sendrecv", 2) == 1.0
    algbw, busbw = rep.bandwidths("allreduce", 1_000_000_000, 2, 1.0)
    assert algbw == pytest.approx(1.0) and busbw == pytest.approx(1.0)


@pytest.mark.parametrize("op", [op for op in rep.OPS])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_expected_results_are_what_a_correct_collective_gives(op, dtype):
    n, count = 3, 12
    inputs = [rep.inputs_for(op, r, n, count // n if op == "allgather" else count) for r in range(n)]
    chunk = count // n
    for r in range(n):
        if op == "allreduce":
            got = sum(inputs)
        elif op == "reducescatter":
            got = sum(inputs)[r * chunk:(r + 1) * chunk]
        elif op == "allgather":
            got = np.concatenate(inputs)
        elif op == "broadcast":
            got = inputs[0]
        elif op == "alltoall":
            got = np.concatenate([inputs[i][r * chunk:(r + 1) * chunk] for i in range(n)])
        else:
            got = inputs[(r - 1) % n]
        assert rep.count_wrong(got, rep.expected_for(op, r, n, count), dtype) == 0


def test_a_wrong_result_is_flagged():
    expected = rep.expected_for("allreduce", 0, 2, 100)
    broken = expected.copy()
    broken[[3, 50]] += 1.0
    assert rep.count_wrong(broken, expected, "fp32") == 2
    assert rep.count_wrong(expected[:50], expected, "fp32") == 100  # truncated: all wrong
    assert rep.count_wrong(rep.inputs_for("allreduce", 1, 2, 100), expected, "bf16") > 0  # not reduced at all


def test_ring_model_fit_recovers_alpha_beta():
    n, alpha, beta = 4, 5e-6, 10e9
    sizes = [2**k for k in range(3, 28, 2)]
    times = [2 * (n - 1) * alpha + 2 * (n - 1) / n * s / beta for s in sizes]
    fit = rep.fit_ring_model(sizes, times, n)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert fit["beta_Bps"] == pytest.approx(beta, rel=1e-6)
    assert fit["rms_relative_error"] < 1e-9


def test_table_and_plot(tmp_path):
    records = [{"backend": b, "op": "allreduce", "dtype": "fp32", "bytes": s, "np": 2, "time_s": 1e-4,
                "algbw_GBps": 1.0, "busbw_GBps": 1.0, "wrong": 0, "correct": True}
               for b in ("mpi4py", "horovod-mpi") for s in (8, 1024)]
    assert "horovod-mpi" in rep.format_table(records)
    path = rep.plot_busbw(records, str(tmp_path / "busbw.png"))
    assert (tmp_path / "busbw.png").stat().st_size > 5000 and path.endswith(".png")
