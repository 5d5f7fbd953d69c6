"""`bench comm` checks every timed result, outside the timed region, and gives in-place ops
their input back before each call (tested through ``measure`` with a fake backend)."""

from types import SimpleNamespace

import numpy as np
import torch

from hvdllm.bench import comm_report as rep
from hvdllm.bench.comm import measure
from hvdllm.bench.comm_backends import Case


class TwoEqualRanks:
    """The control plane seen from rank 0 of a job whose rank 1 measures the same."""

    size, rank = 2, 0

    def agree(self, ok):
        return ok

    def barrier(self):
        pass

    def allgather(self, value):
        return [value, value]


class InPlaceSum:
    """An fp16 in-place allreduce over 2 ranks as rank 0 sees it (its buffer becomes 1 + 2
    times the pattern), wrong on call ``bad_call`` only."""

    name = "fake"

    def __init__(self, bad_call: int = 0) -> None:
        self.bad_call, self.calls = bad_call, 0

    def prepare(self, op, dtype, count):
        source = rep.inputs_for(op, 0, 2, count).astype(np.float16)
        buf = source.copy()

        def run():
            self.calls += 1
            buf[:] = 0 if self.calls == self.bad_call else buf * 3  # grows unless reset: 7 * 3^9 > fp16 max

        return Case(run, lambda: buf.astype(np.float64), lambda: np.copyto(buf, source))


def _measure(backend, iters: int, warmup: int = 2) -> dict:
    options = SimpleNamespace(ops=["allreduce"], dtypes=["fp16"], message_sizes=[256], warmup=warmup, iters=iters)
    (record,) = measure(backend, TwoEqualRanks(), options, torch.device("cpu"), say=print)
    return record


def test_every_timed_result_is_checked():
    clean = _measure(InPlaceSum(), iters=6)
    assert clean["correct"] and clean["checked"] == 1 + 6
    late = _measure(InPlaceSum(bad_call=1 + 2 + 5), iters=6)  # the 5th timed call (after the first and warm-up)
    assert not late["correct"] and late["wrong"] == 2 * 128  # every element, counted on both ranks


def test_in_place_buffer_gets_its_input_back_so_fp16_stays_finite():
    record = _measure(InPlaceSum(), iters=40, warmup=5)  # 46 unreset calls would reach inf
    assert record["correct"] and record["checked"] == 41
