"""The phases of ``hvdllm prepare`` as the user sees them: a bar on a terminal (rank 0's share
of the input: MB, MB/s, ETA, documents/s), one line a phase otherwise; per-phase seconds and peak RSS kept
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


class Progress:
    """A phase's bar over this rank's input bytes, with documents per second beside it (shown
    on rank 0 on a terminal; silent elsewhere)."""

    def __init__(self, name: str, input_bytes: int, rank: int) -> None:
        self.bar = tqdm(total=input_bytes, unit="B", unit_scale=True, desc=name, file=sys.stderr,
                        disable=True if rank or not input_bytes else None)
        self.start = time.perf_counter()
        self.documents = 0

    @property
    def shown(self) -> bool:
        return not self.bar.disable

    def advance(self, input_bytes: int, documents: int) -> None:
        self.documents += documents
        self.bar.update(input_bytes)
        if self.shown:
            rate = self.documents / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} docs/s")

    def close(self) -> None:
        self.bar.close()


class Phases:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, input_bytes: int = 0) -> Iterator:
        """Time a phase; yields its Progress, to advance by each finished chunk of this rank's
        ``input_bytes``."""
        start = time.perf_counter()
        progress = Progress(name, input_bytes, self.rank)
        shown = progress.shown  # tqdm's close() disables the bar
        try:
            yield progress
        finally:
            progress.close()
        self.seconds[name] = time.perf_counter() - start
        self.peak_rss_mb[name] = peak_rss_mb()
        if self.rank == 0 and not shown:
            rate = f", {input_bytes / 1e6:.1f} MB at {input_bytes / 1e6 / max(self.seconds[name], 1e-9):.2f} MB/s" \
                if input_bytes else ""
            print(f"prepare: {name} {self.seconds[name]:.1f} s{rate}, peak RSS {self.peak_rss_mb[name]:.0f} MB",
                  file=sys.stderr, flush=True)
