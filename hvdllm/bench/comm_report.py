"""The arithmetic of the communication benchmark, kept free of any communication library:
message sizes, the nccl-tests bandwidth factors, expected results and their check, the
alpha-beta ring model fit, the table and the plot."""

from __future__ import annotations

import math
import re

import numpy as np

from hvdllm.errors import UserError

OPS = ("allreduce", "allgather", "broadcast", "reducescatter", "alltoall", "sendrecv")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"malformed size {text!r}: use a number with an optional unit B, KB, MB or GB (e.g. 64MB)")
    value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise UserError(f"size {text!r} must be at least 1 byte")
    return value


def parse_sizes(text: str, factor: int) -> list[int]:
    """``8B:256MB`` -> 8, 8*factor, ... up to 256 MiB (the maximum included)."""
    if factor < 2:
        raise UserError(f"--factor must be >= 2, got {factor}")
    parts = text.split(":")
    if len(parts) != 2:
        raise UserError(f"malformed --sizes {text!r}: expected MIN:MAX, e.g. 8B:256MB")
    low, high = parse_size(parts[0]), parse_size(parts[1])
    if low > high:
        raise UserError(f"malformed --sizes {text!r}: {low} B is above {high} B")
    sizes, size = [], low
    while size < high:
        sizes.append(size)
        size *= factor
    sizes.append(high)
    return sizes


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw = algbw x factor: the share of the data each link carries, so that
    busbw is comparable across ops and rank counts (nccl-tests doc/PERFORMANCE.md)."""
    if op == "allreduce":
        return 2 * (n - 1) / n
    if op in ("allgather", "reducescatter", "alltoall"):
        return (n - 1) / n
    return 1.0  # broadcast, sendrecv


def bandwidths(op: str, nbytes: int, n: int, seconds: float) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes) for a message of ``nbytes`` (nccl-tests' size:
    the whole buffer, i.e. the gathered output for allgather, the input for reducescatter)."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * bus_factor(op, n)


def pattern(count: int, offset: int = 0) -> np.ndarray:
    """Small integers 1..7 by element index: exact in fp16 and bf16 sums of a few ranks."""
    return ((np.arange(offset, offset + count) % 7) + 1).astype(np.float64)


def inputs_for(op: str, rank: int, n: int, count: int) -> np.ndarray:
    """What rank ``rank`` sends (``count`` elements: the whole buffer, or its own chunk for
    allgather)."""
    if op in ("allreduce", "reducescatter"):
        return (rank + 1) * pattern(count)
    if op == "allgather":
        return (rank + 1) * pattern(count, offset=rank * count)
    if op == "broadcast":
        return pattern(count) if rank == 0 else np.zeros(count)
    if op == "alltoall":  # chunk j goes to rank j
        chunk = count // n
        return np.concatenate([np.full(chunk, rank * n + j + 1.0) for j in range(n)])
    if op == "sendrecv":  # to the next rank in a ring
        return np.full(count, rank + 1.0)
    raise ValueError(op)


def expected_for(op: str, rank: int, n: int, count: int) -> np.ndarray:
    """What rank ``rank`` must hold afterwards (``count``: the whole buffer)."""
    total = n * (n + 1) / 2
    if op == "allreduce":
        return total * pattern(count)
    if op == "reducescatter":
        chunk = count // n
        return total * pattern(chunk, offset=rank * chunk)
    if op == "allgather":  # count is the gathered total; each rank sent count / n
        chunk = count // n
        return np.concatenate([(r + 1) * pattern(chunk, offset=r * chunk) for r in range(n)])
    if op == "broadcast":
        return pattern(count)
    if op == "alltoall":
        chunk = count // n
        return np.concatenate([np.full(chunk, i * n + rank + 1.0) for i in range(n)])
    if op == "sendrecv":
        return np.full(count, (rank - 1) % n + 1.0)
    raise ValueError(op)


def count_wrong(result: np.ndarray, expected: np.ndarray, dtype: str) -> int:
    """Elements off by more than the dtype's rounding (nccl-tests' #wrong)."""
    tolerance = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}[dtype]
    result = np.asarray(result, dtype=np.float64).reshape(-1)
    if result.shape != expected.shape:
        return int(expected.size)
    return int(np.count_nonzero(np.abs(result - expected) > tolerance * np.maximum(1.0, np.abs(expected))))


def fit_ring_model(sizes: list[int], seconds: list[float], n: int) -> dict:
    """Least-squares fit of T = 2(n-1) alpha + 2(n-1)/n * S / beta to allreduce times.

    Returns alpha (s), beta (bytes/s) and the RMS relative error of the fit; the fit is
    weighted by 1/T so that small and large messages count alike.
    """
    s = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    design = np.stack([np.full_like(s, 2 * (n - 1)), 2 * (n - 1) / n * s], axis=1) / t[:, None]
    (alpha, inv_beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    predicted = 2 * (n - 1) * alpha + 2 * (n - 1) / n * s * inv_beta
    error = float(np.sqrt(np.mean(((predicted - t) / t) ** 2)))
    return {"alpha_s": float(alpha), "beta_Bps": float(1 / inv_beta) if inv_beta > 0 else math.inf,
            "rms_relative_error": error}


def format_size(nbytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def format_table(records: list[dict]) -> str:
    lines = [f"{'backend':<14}{'op':<14}{'dtype':<6}{'size':>8}{'time(us)':>12}{'algbw':>9}{'busbw':>9}{'#wrong':>8}"]
    for r in records:
        lines.append(f"{r['backend']:<14}{r['op']:<14}{r['dtype']:<6}{format_size(r['bytes']):>8}"
                     f"{r['time_s'] * 1e6:>12.1f}{r['algbw_GBps']:>9.3f}{r['busbw_GBps']:>9.3f}{r['wrong']:>8}")
    return "\n".join(lines)


def plot_busbw(records: list[dict], path: str, op: str = "allreduce", dtype: str = "fp32") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for backend in sorted({r["backend"] for r in records}):
        rows = sorted((r for r in records if r["backend"] == backend and r["op"] == op and r["dtype"] == dtype),
                      key=lambda r: r["bytes"])
        if rows:
            ax.plot([r["bytes"] for r in rows], [r["busbw_GBps"] for r in rows], "o-", label=backend)
    ax.set(xscale="log", xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
           title=f"{op} {dtype}, {records[0]['np'] if records else '?'} ranks")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
