"""The phases of ``hvdllm prepare`` as the user sees them: a bar on a terminal (rank 0's share
of the input: MB, MB/s, ETA), one line a phase otherwise; per-phase seconds and peak RSS kept
for the manifest."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _NoBar:
    disable = True

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class Phases:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, input_bytes: int = 0) -> Iterator:
        """Time a phase; with ``input_bytes`` (this rank's input) it yields a bar to update with
        the bytes of each finished chunk."""
        start = time.perf_counter()
        bar = tqdm(total=input_bytes, unit="B", unit_scale=True, desc=name, file=sys.stderr,
                   disable=True if self.rank else None) if input_bytes else _NoBar()
        try:
            yield bar
        finally:
            bar.close()
        self.seconds[name] = time.perf_counter() - start
        self.peak_rss_mb[name] = peak_rss_mb()
        if self.rank == 0 and bar.disable:
            rate = f", {input_bytes / 1e6:.1f} MB at {input_bytes / 1e6 / max(self.seconds[name], 1e-9):.2f} MB/s" \
                if input_bytes else ""
            print(f"prepare: {name} {self.seconds[name]:.1f} s{rate}, peak RSS {self.peak_rss_mb[name]:.0f} MB",
                  file=sys.stderr, flush=True)
