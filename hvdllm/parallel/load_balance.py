"""``parallel.load_balance``: split each clock's global batch among the workers by speed.

A persistently slow worker (older GPU, busy node) holds every synchronous step back. With a
parameter server at ``max_staleness = 0`` the update of a clock is the mean gradient over
its global batch, whoever computed which sample; so server 0 hands each worker a contiguous
span of the global batch sized by how fast it has been (LB-BSP: Chen et al., "Semi-Dynamic
Load Balancing", SoCC 2020), and the servers weight each push by the samples it computed.
The update is that of ``sync`` (the same samples, the same mean; only the order of float
sums differs), and all workers finish a clock at about the same time.

The split is pure functions of the timings and the state that feeds them, with no MPI, so
that it is testable in one process (the server's state machine, ps_state.py, calls it).
"""

from __future__ import annotations

import heapq

SMOOTHING = 0.5  # weight of the newest timing: follows a change within a few clocks, damps noise


def even_spans(samples: int, workers: list[int]) -> dict[int, tuple[int, int]]:
    """The static split: worker ``w`` of the live ones gets its equal slice, in rank order
    (for ``len(workers)`` dividing ``samples``: exactly the slice sync's loader gives it)."""
    return spans_by_speed(samples, {w: 1.0 for w in workers}, most=samples)


def spans_by_speed(samples: int, seconds_per_sample: dict[int, float], most: int) -> dict[int, tuple[int, int]]:
    """(start, count) of each worker's span of a global batch of ``samples``: each sample in
    turn goes to the worker that would finish its span soonest with it (so the slowest
    finish is as early as it can be), at least one and at most ``most`` samples each (a
    bound on a worker's activation memory); spans contiguous in rank order, covering the
    batch exactly."""
    workers = sorted(seconds_per_sample)
    if not 0 < len(workers) <= samples <= most * len(workers):
        raise ValueError(f"cannot split {samples} samples among {len(workers)} workers, 1 to {most} each")
    counts = dict.fromkeys(workers, 1)
    finish = [(2 * seconds_per_sample[w], w) for w in workers]  # with one more sample each
    heapq.heapify(finish)
    for _ in range(samples - len(workers)):
        _, w = heapq.heappop(finish)
        counts[w] += 1
        if counts[w] < most:
            heapq.heappush(finish, ((counts[w] + 1) * seconds_per_sample[w], w))
    spans, start = {}, 0
    for w in workers:
        spans[w] = (start, counts[w])
        start += counts[w]
    return spans


def smoothed(previous: float | None, seconds: float, count: int) -> float:
    """The next estimate of a worker's seconds per sample after a clock of ``count`` samples
    took it ``seconds`` (its own timing of its forward and backward, sent with its push)."""
    current = seconds / max(count, 1)
    return current if previous is None else SMOOTHING * current + (1 - SMOOTHING) * previous


class BatchSplitter:
    """Server 0's side of ``parallel.load_balance``: from each push, the seconds its worker
    took per sample (its own timing of its forward and backward, so evaluations, checkpoints
    and start-up do not count), and the next clock's spans. Off (``enabled`` False: other
    servers, or the option unset), every worker keeps its even slice; the samples each worker
    computed are counted either way."""

    def __init__(self, global_batch: int, workers: int, enabled: bool) -> None:
        self.global_batch, self.workers, self.enabled = global_batch, workers, enabled
        self.spans = even_spans(global_batch, list(range(workers)))
        self.seconds_per_sample: dict[int, float] = {}
        self.samples = [0] * workers

    def pushed(self, worker: int, samples: int, seconds: float) -> None:
        self.samples[worker] += samples
        if self.enabled:
            self.seconds_per_sample[worker] = smoothed(self.seconds_per_sample.get(worker), seconds, samples)

    def rebalance(self, live: set[int]) -> None:
        """Between two clocks: the next one's spans, by the live workers' speeds (even until
        every one of them has been timed)."""
        if not self.enabled or not live:
            return
        timed = {w: self.seconds_per_sample.get(w) for w in live}
        if None in timed.values():
            self.spans = even_spans(self.global_batch, sorted(live))
        else:  # at most twice what the even split of all workers gives (more if many died)
            most = max(2 * self.global_batch // self.workers, -(-self.global_batch // len(live)))
            self.spans = spans_by_speed(self.global_batch, timed, most)

    def span(self, worker: int | None) -> tuple[int, int]:
        return self.spans.get(worker, (0, 0))
