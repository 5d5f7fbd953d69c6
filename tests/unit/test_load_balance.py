"""How server 0 splits a clock's global batch among workers of different speeds
(parallel.load_balance): contiguous spans in rank order that cover the batch exactly, sized
so that all finish together, at least one sample each and at most a bound."""

import pytest

from hvdllm.parallel.load_balance import BatchSplitter, even_spans, smoothed, spans_by_speed


def covers(spans, samples):
    starts = [spans[w] for w in sorted(spans)]
    position = 0
    for start, count in starts:
        assert start == position and count >= 1
        position += count
    return position == samples


def test_equal_speeds_give_each_worker_its_own_slice_as_sync_reads_it():
    assert even_spans(24, [0, 1, 2]) == {0: (0, 8), 1: (8, 8), 2: (16, 8)}
    assert spans_by_speed(24, {0: 0.1, 1: 0.1, 2: 0.1}, most=16) == even_spans(24, [0, 1, 2])


def test_a_worker_twice_as_slow_gets_half_the_samples_of_each_other():
    spans = spans_by_speed(25, {0: 0.01, 1: 0.02, 2: 0.01}, most=25)
    assert covers(spans, 25)
    assert spans[1][1] == 5 and spans[0][1] == spans[2][1] == 10


@pytest.mark.parametrize("samples, times", [
    (7, {0: 1.0, 1: 1e6}), (3, {0: 0.5, 1: 0.5, 2: 100.0}), (64, {0: 0.3, 3: 0.1, 5: 0.7}), (5, {4: 2.0}),
])
def test_spans_cover_the_batch_exactly_and_no_live_worker_is_left_without_one(samples, times):
    spans = spans_by_speed(samples, times, most=samples)
    assert sorted(spans) == sorted(times) and covers(spans, samples)


def test_no_worker_gets_more_than_the_bound_however_fast():
    spans = spans_by_speed(24, {0: 0.001, 1: 1.0, 2: 0.001}, most=10)
    assert covers(spans, 24) and spans[0][1] == spans[2][1] == 10 and spans[1][1] == 4


def test_a_dead_worker_s_share_goes_to_the_live_ones():
    assert even_spans(24, [0, 2]) == {0: (0, 12), 2: (12, 12)}


def test_a_batch_that_does_not_fit_cannot_be_split():
    with pytest.raises(ValueError, match="cannot split 2 samples among 3 workers, 1 to 2 each"):
        spans_by_speed(2, {0: 1.0, 1: 1.0, 2: 1.0}, most=2)
    with pytest.raises(ValueError, match="cannot split 9 samples among 2 workers, 1 to 4 each"):
        spans_by_speed(9, {0: 1.0, 1: 1.0}, most=4)


def test_timings_are_smoothed_per_sample():
    assert smoothed(None, 2.0, 4) == 0.5
    assert smoothed(0.5, 4.0, 4) == 0.75


def test_server_0_splits_by_the_seconds_the_workers_report_once_all_are_timed():
    splitter = BatchSplitter(global_batch=24, workers=3, enabled=True)
    assert splitter.spans == even_spans(24, [0, 1, 2])
    splitter.pushed(0, 8, 0.8)
    splitter.pushed(1, 8, 3.2)
    splitter.rebalance({0, 1, 2})
    assert splitter.spans == even_spans(24, [0, 1, 2])  # worker 2 not timed yet
    splitter.pushed(2, 8, 0.8)
    splitter.rebalance({0, 1, 2})
    # 4x slower: about a quarter of a fast one's share (10.7 each and 2.7, continuously)
    assert splitter.spans == {0: (0, 11), 1: (11, 2), 2: (13, 11)}
    assert splitter.samples == [8, 8, 8]


def test_the_live_workers_share_a_dead_one_s_samples_up_to_twice_the_even_share():
    splitter = BatchSplitter(global_batch=24, workers=3, enabled=True)
    for worker, seconds in ((0, 0.1), (1, 10.0), (2, 0.1)):
        splitter.pushed(worker, 8, seconds)
    splitter.rebalance({0, 1, 2})
    assert [splitter.span(w)[1] for w in range(3)] == [12, 1, 11]
    splitter.rebalance({0, 1})  # worker 2 died: the fast one may take 16 (twice 8), the slow one the rest
    assert splitter.spans == {0: (0, 16), 1: (16, 8)} and splitter.span(2) == (0, 0)


def test_off_every_worker_keeps_its_slice_and_its_samples_are_counted():
    splitter = BatchSplitter(global_batch=24, workers=3, enabled=False)
    splitter.pushed(1, 8, 99.0)
    splitter.rebalance({0, 1, 2})
    assert splitter.spans == even_spans(24, [0, 1, 2]) and splitter.samples == [0, 8, 0]
