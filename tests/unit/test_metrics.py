"""Where MFU's peak comes from, and how step lines are written."""

import json

import pytest
import torch

from hvdllm.train import metrics
from hvdllm.train.metrics import duration, peak_flops, step_fields


def test_configured_peak_is_used_and_named():
    assert peak_flops(torch.device("cpu"), "fp32", configured=5e11) == (5e11, "train.peak_flops")


def test_gpu_peak_is_that_of_the_precision_trained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu, matmul = torch.device("cuda"), torch.backends.cuda.matmul  # a flag object: no monkeypatch
    allowed = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert peak_flops(gpu, "bf16") == (989e12, "H100 data sheet, bf16")
        assert peak_flops(gpu, "fp32") == (67e12, "H100 data sheet, fp32")  # no tensor cores for plain fp32
        matmul.allow_tf32 = True
        assert peak_flops(gpu, "fp32") == (494.5e12, "H100 data sheet, tf32")
    finally:
        matmul.allow_tf32 = allowed


def test_cpu_peak_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flops, source = peak_flops(torch.device("cpu"), "fp32")
    cache = tmp_path / "hvdllm" / "peak_flops.json"
    assert source == f"measured: fp32 matmul probe, cached in {cache}"
    assert 1e8 < flops < 1e13  # a real measurement, not cores x a guessed rate
    assert list(json.loads(cache.read_text()).values()) == [flops]

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(metrics, "_probe_matmul", no_probe)
    assert peak_flops(torch.device("cpu"), "fp32") == (flops, source)


def test_step_fields_say_a_skipped_step_and_use_one_format():
    fields = step_fields({"step": 3, "loss": float("nan"), "skipped": True, "lr": 3e-3, "tokens_per_s": 12345.6,
                          "mfu": 0.0512, "interval_step_s": 0.0456})
    assert fields == ["loss n/a (skipped: non-finite)", "lr 3.00e-03", "12,346 tok/s", "mfu 5.12%", "45.6 ms/step"]
    assert step_fields({"step": 1, "loss": 5.52, "val_loss": 5.1, "val_ppl": 164.02})[:3] == [
        "loss 5.5200", "val_loss 5.1000", "val_ppl 164.02"]
    assert duration(3725.4) == "1:02:05"


@pytest.mark.parametrize("message, stream", [("warning: x", "err"), ("error: y", "err"), ("checkpoint: z", "out")])
def test_warnings_and_errors_go_to_stderr(capsys, message, stream):
    metrics.print_line(message)
    captured = capsys.readouterr()
    assert getattr(captured, stream) == message + "\n"


def test_count_lists_become_tensorboard_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = metrics.MetricsLogger(tmp_path, total_steps=2, tensorboard=True, progress=False)
    logger.log({"step": 1, "loss": 2.0, "staleness_hist": [3, 0, 2]})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "staleness_hist" in events.Tags()["histograms"] and "loss" in events.Tags()["scalars"]
    histogram = events.Histograms("staleness_hist")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max, histogram.sum) == (5, 0, 2, 4)
